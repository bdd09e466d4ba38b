"""Job demands: the runtime model and the planner adapter behind it."""

from __future__ import annotations

import pytest
from sample_jobs import demand

from evalfleet.engines.job_size import estimate_work_tokens
from evalfleet.orchestrator.demand import JobDemand, demand_from_plan, slot_inventory, startup_seconds
from evalfleet.planning import Inventory, plan
from evalfleet.types import UsageError


def test_runtime_scales_with_replicas_after_startup():
    job = demand(replicas=4, seconds=400.0, startup=20.0)
    assert job.runtime(1) == 420.0 and job.runtime(4) == 120.0 and job.runtime(4, warm=True) == 110.0
    assert job.min_gpu_seconds() == job.gpu_seconds(1) == 420.0
    assert job.replicas_within(1000.0) == 1
    assert job.replicas_within(200.0) == 3
    assert job.replicas_within(10.0) == 4
    assert JobDemand.from_dict(job.to_dict()) == job
    assert job.with_work(-5).work_tokens == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tokens_per_s": ()}, "positive throughput"),
        ({"tokens_per_s": (1.0, 0.0)}, "positive throughput"),
        ({"min_replicas": 3}, "outside 1..2"),
        ({"tp": 0}, "at least 1"),
        ({"work_tokens": -1.0}, "not negative"),
    ],
)
def test_invalid_demands_are_refused(kwargs, message):
    base = {"model": "m", "work_tokens": 1.0, "tokens_per_s": (1.0, 2.0)}
    with pytest.raises(ValueError, match=message):
        JobDemand(**{**base, **kwargs})


def test_startup_and_work_estimates():
    cold, warm = startup_seconds(16e9, 2)
    assert cold > warm > 0
    assert startup_seconds(16e9, 8)[0] < cold
    assert estimate_work_tokens(2, 10, tokens_per_request=100) == 2000.0
    assert estimate_work_tokens(1, None) > estimate_work_tokens(1, 10)


def test_demand_from_plan_uses_the_planner_speed_for_every_replica_count():
    cluster = Inventory.from_spec("2x8xH100-80GB")
    layout_plan = plan("meta-llama/Llama-3.1-70B", cluster)
    job = demand_from_plan(layout_plan, cluster, work_tokens=1e8, model="llama70")
    assert (job.tp, job.pp, job.max_replicas) == (layout_plan.layout.tp, layout_plan.layout.pp, layout_plan.layout.dp)
    for k in (1, job.max_replicas):
        expected = plan("meta-llama/Llama-3.1-70B", cluster, tp=job.tp, pp=job.pp, dp=k).estimated_tokens_per_s
        assert job.tokens_per_s[k - 1] == pytest.approx(expected)
    assert job.tokens_per_s == tuple(sorted(job.tokens_per_s))
    assert job.need_gb == pytest.approx(layout_plan.per_gpu.total)


def test_a_plan_demand_runs_at_the_speed_measured_for_its_key():
    from evalfleet.orchestrator.demand import plan_demand
    from evalfleet.planning.calibration import Calibration, CalibrationKey, inventory_hardware, model_shape

    cluster = Inventory.from_spec("2x8xH100-80GB")
    layout_plan = plan("meta-llama/Llama-3.1-8B", cluster)
    modeled = demand_from_plan(layout_plan, cluster, work_tokens=1e8, model="llama8")
    assert plan_demand(layout_plan, cluster, work_tokens=1e8, model="llama8") == modeled  # nothing measured yet
    layout = layout_plan.layout
    key = CalibrationKey(model_shape(layout_plan.profile), layout_plan.backend, layout_plan.dtype, layout.tp, layout.pp,
                         layout.dp, inventory_hardware(cluster))
    assert key.hardware == "H100"
    Calibration().record(key, "loglikelihood", int(layout_plan.estimated_tokens_per_s * 10), 20.0)  # half as fast
    measured = plan_demand(layout_plan, cluster, work_tokens=1e8, model="llama8")
    assert measured.tokens_per_s == pytest.approx(tuple(rate / 2 for rate in modeled.tokens_per_s))
    assert measured.runtime(1) - measured.startup_s == pytest.approx(2 * (modeled.runtime(1) - modeled.startup_s))


def test_slot_inventory():
    slots = slot_inventory(3, memory_gb=8)
    assert slots.is_cpu_only and len(slots.nodes[0].gpus) == 3
    assert slot_inventory(1).nodes[0].gpus[0].free_gb > 0
    with pytest.raises(UsageError, match="--slots must be at least 1"):
        slot_inventory(0)
