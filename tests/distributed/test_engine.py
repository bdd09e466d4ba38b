"""The distributed engine end to end: lm-eval tasks give the lightweight engine's samples, the
layout is chosen and recorded, preloaded groups are reused, memory is released, Ctrl-C works."""

from __future__ import annotations

import asyncio
import json

import pytest
from distributed_support import alive
from faultenv import fault_env
from samples import compare_samples, load_samples

from evalfleet.engines.distributed import DistributedEvaluationEngine, cpu_layout, gpu_layout, next_larger_plan
from evalfleet.engines.lightweight import LightweightEvaluationEngine
from evalfleet.engines.router import select_engine
from evalfleet.types import DistributionStrategy, EvalfleetError, EvaluationRequest

pytestmark = pytest.mark.slow

TASKS = "demo_mc,demo_arith,demo_ppl"


def _request(model, out, **overrides) -> EvaluationRequest:
    fields = {
        "model": {"path": str(model), "dtype": "float32", "device": "cpu"},
        "tasks": {"names": TASKS, "limit": 6},
        "output_dir": str(out),
        "log_samples": True,
        "use_cache": False,
        "engine": "distributed",
    }
    fields.update(overrides)
    return EvaluationRequest.model_validate(fields)


@pytest.fixture(scope="module")
def single_device_samples(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("lightweight")
    request = _request(llama, out, engine="lightweight")
    asyncio.run(LightweightEvaluationEngine().evaluate(request))
    return load_samples(out)


@pytest.fixture(scope="module")
def engine():
    engine = DistributedEvaluationEngine()
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("strategy", ["dp", "pp"])
def test_lm_eval_tasks_give_the_single_device_samples(strategy, engine, llama, single_device_samples, tmp_path):
    result = asyncio.run(engine.evaluate(_request(llama, tmp_path, strategy=strategy)))
    problems = compare_samples(single_device_samples, load_samples(tmp_path))
    assert not problems, "\n".join(problems[:10])
    document = json.loads((tmp_path / "results.json").read_text())
    layout = document["evalfleet"]["layout"]
    assert document["evalfleet"]["engine"] == "distributed"
    assert layout["strategy"] == strategy
    assert (layout["tp"], layout["pp"], layout["dp"]) == ((1, 1, 2) if strategy == "dp" else (1, 2, 1))
    assert layout["placement"] and 0 <= layout["communication"]["share"] <= 1
    assert layout["parallel_path"] == ("single" if strategy == "dp" else "transformers-pp")
    assert len(document["evalfleet"]["distributed"]["memory_bytes_per_rank"]) == (1 if strategy == "dp" else 2)
    assert result.metrics() == document["results"]


def test_groups_of_one_request_stop_with_it_and_preloaded_ones_are_reused(engine, llama, tmp_path):
    small = {"names": "demo_mc", "limit": 2}
    asyncio.run(engine.evaluate(_request(llama, tmp_path / "a", dp=1, tasks=small)))
    assert engine.loaded_models() == []

    info = engine.preload(str(llama), dp=1)
    assert len(info.parameters_per_rank) == 1 and info.parameter_bytes > 0
    pids = [pid for group in info.runner.worker_pids() for pid in group]
    asyncio.run(engine.evaluate(_request(llama, tmp_path / "b", dp=1, tasks=small)))
    assert [pid for group in info.runner.worker_pids() for pid in group] == pids
    assert engine.loaded_models() == [info]

    assert engine.optimize_memory() == info.parameter_bytes
    assert engine.loaded_models() == [] and not alive(pids)


def test_the_memory_budget_evicts_the_least_recently_used_group(llama):
    engine = DistributedEvaluationEngine(memory_budget_bytes=1)
    try:
        first = engine.preload(str(llama), dp=1)
        second = engine.preload(str(llama), strategy="dp", dp=2)
        assert engine.loaded_models() == [second]
        assert first.runner.worker_pids() == [[]]
    finally:
        engine.shutdown()
    assert second.runner.worker_pids() == [[], []]


def test_out_of_memory_at_load_on_the_cpu_is_a_clear_error(llama, tmp_path):
    engine = DistributedEvaluationEngine(env=fault_env("oom_at_load"))
    with pytest.raises(EvalfleetError, match="does not fit in memory with tp=1, pp=1"):
        asyncio.run(engine.evaluate(_request(llama, tmp_path, dp=1)))
    assert engine.loaded_models() == []


def test_capabilities_and_routing(llama):
    engine = DistributedEvaluationEngine()
    capabilities = engine.get_capabilities()
    assert {"tp", "pp", "hybrid", "dp"} <= set(capabilities.strategies)
    assert capabilities.parallel_paths["hybrid"] == "torch-hybrid"
    assert capabilities.max_model_gb > 0
    request = _request(llama, None, engine="auto", strategy="tp", tp=2)
    assert isinstance(select_engine(request), DistributedEvaluationEngine)
    assert engine.can_handle_request(request)
    assert not engine.can_handle_request(_request(llama, None, engine="lightweight"))
    assert not engine.can_handle_request(_request(llama, None, strategy="single", tp=2))


def test_cpu_layouts_follow_the_hints():
    def degrees(strategy, tp=None, pp=None, dp=None):
        layout = cpu_layout(strategy, tp, pp, dp)
        return layout.tp, layout.pp, layout.dp

    assert degrees(DistributionStrategy.TENSOR_PARALLEL) == (2, 1, 1)
    assert degrees(DistributionStrategy.HYBRID) == (2, 2, 1)
    assert degrees(DistributionStrategy.AUTO, pp=3) == (1, 3, 1)
    layout = cpu_layout(DistributionStrategy.DATA_PARALLEL, None, None, 3)
    assert layout.devices == (("cpu",), ("cpu",), ("cpu",)) and layout.threads >= 1
    assert layout.strategy is DistributionStrategy.DATA_PARALLEL
    with pytest.raises(EvalfleetError, match="degree above 1"):
        cpu_layout(DistributionStrategy.TENSOR_PARALLEL, 1, None, None)


class _Plan:
    def __init__(self, tp, pp, dp, placement, fits=True, reason="fits", alternatives=()):
        from evalfleet.planning import ParallelLayout

        self.layout, self.placement, self.fits = ParallelLayout(tp, pp, dp), placement, fits
        self.reason, self.alternatives = reason, list(alternatives)


def test_gpu_plans_become_one_device_per_rank_and_oom_moves_to_a_larger_layout():
    layout = gpu_layout(_Plan(2, 1, 2, [(0, 0), (0, 1), (0, 2), (0, 3)]))
    assert layout.devices == (("cuda:0", "cuda:1"), ("cuda:2", "cuda:3"))
    assert layout.placement_lists() == [[0, 0], [0, 1], [0, 2], [0, 3]]
    with pytest.raises(EvalfleetError, match="no layout fits: too big"):
        gpu_layout(_Plan(1, 1, 1, [], fits=False, reason="too big"))
    with pytest.raises(EvalfleetError, match="spans 2 nodes"):
        gpu_layout(_Plan(1, 2, 1, [(0, 0), (1, 0)]))
    four, two = _Plan(4, 1, 1, [(0, i) for i in range(4)]), _Plan(2, 1, 1, [(0, 0), (0, 1)])
    chosen = _Plan(1, 1, 1, [(0, 0)], alternatives=[four, two])
    assert next_larger_plan(chosen, 1) is two
    assert next_larger_plan(chosen, 4) is None
