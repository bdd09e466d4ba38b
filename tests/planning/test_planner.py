"""plan(): classes of outcome on well-known models, forced strategies, the scheduler's knobs, JSON."""

from __future__ import annotations

import json

import pytest

from evalfleet.planning import (
    GPU,
    DistributionStrategy,
    Inventory,
    Node,
    ParallelLayout,
    PlanningError,
    place,
    plan,
    profile_model,
)
from evalfleet.planning.hardware import CPU_SPEC
from evalfleet.types import DistributionStrategy as TypesStrategy

S = DistributionStrategy


def _plan(model: str, gpus: str, **kwargs):
    return plan(profile_model(model), Inventory.from_spec(gpus), **kwargs)


def test_seven_b_on_a_node_is_replicated():
    result = _plan("meta-llama/Llama-2-7b-hf", "8xA100-80GB")
    assert result.fits and result.layout.tp == result.layout.pp == 1 and result.layout.dp >= 4
    assert result.strategy is S.DATA_PARALLEL and result.engine == "lightweight"


def test_llama2_70b_on_8xa100_uses_tensor_parallelism():
    result = _plan("meta-llama/Llama-2-70b-hf", "8xA100-80GB")
    assert result.fits and result.layout.tp >= 2 and result.engine == "distributed"
    assert result.per_gpu.total <= 80


def test_falcon_180b_on_8xa100_uses_all_eight():
    result = _plan("tiiuae/falcon-180B", "8xA100-80GB", backend="any")  # the shape alone; see test_plan_backends
    assert result.fits and result.layout.world_size == 8 and result.gpus_used == 8
    assert 232 % result.layout.tp == 0


def test_llama31_405b_does_not_fit_one_h100_node():
    result = _plan("meta-llama/Llama-3.1-405B", "8xH100-80GB")
    assert not result.fits and result.placement == [] and result.gpus_used == 0
    assert result.reason.startswith("needs ") and "per GPU at best (tp=8, pp=1)" in result.reason
    assert result.reason.endswith("the largest GPU has 80 GB")
    assert result.per_gpu.total > 80


def test_llama31_405b_on_two_h100_nodes_pipelines_across_them():
    result = _plan("meta-llama/Llama-3.1-405B", "2x8xH100-80GB")
    assert result.fits and result.layout.pp == 2 and result.layout.tp == 8 and result.nodes_used == 2
    stage_nodes = [{n for n, _ in result.placement[s * 8 : s * 8 + 8]} for s in range(2)]
    assert stage_nodes == [{0}, {1}]


def test_explicit_strategies_are_honoured():
    cases = {
        "tp": lambda layout: layout.tp > 1 and layout.pp == 1,
        "pp": lambda layout: layout.tp == 1 and layout.pp > 1,
        "hybrid": lambda layout: layout.tp > 1 and layout.pp > 1,
        "dp": lambda layout: layout.world_size == 1 and layout.dp >= 2,
        "single": lambda layout: layout.total_gpus == 1,
    }
    for name, check in cases.items():
        result = _plan("meta-llama/Llama-2-7b-hf", "8xA100-80GB", strategy=name)
        assert result.fits and check(result.layout), name
        assert result.engine == ("lightweight" if name == "single" else "distributed")


def test_explicit_sizes_are_honoured():
    result = _plan("meta-llama/Llama-2-70b-hf", "2x8xA100-80GB", tp=4, pp=2, dp=1)
    assert result.fits and result.layout == ParallelLayout(4, 2, 1) and result.gpus_used == 8
    assert _plan("meta-llama/Llama-2-7b-hf", "8xA100-80GB", dp=3).layout.dp == 3


@pytest.mark.parametrize(
    ("model", "gpus", "kwargs", "message"),
    [
        ("meta-llama/Llama-2-70b-hf", "8xA100-80GB", {"strategy": "single"}, "needs "),
        ("meta-llama/Llama-2-70b-hf", "8xA100-80GB", {"tp": 3}, "tp=3 does not divide the 64 attention heads"),
        ("meta-llama/Llama-2-70b-hf", "8xA100-80GB", {"tp": 16}, "tp=16 needs 16 GPUs in one node"),
        ("gpt2", "8xA100-80GB", {"pp": 13}, "pp=13 exceeds the 12 layers"),
        ("meta-llama/Llama-2-7b-hf", "1xA100-80GB", {"strategy": "dp"}, "needs 2 GPUs"),
        ("meta-llama/Llama-2-7b-hf", "1xA100-80GB", {"strategy": "tp"}, "has no layout on 1 usable GPU"),
        ("meta-llama/Llama-2-70b-hf", "8xA100-80GB", {"max_gpus": 1}, "more than the 1 the job may use"),
        ("meta-llama/Llama-2-7b-hf", "8xA100-80GB", {"dp": 9}, "needs 9 GPUs"),
    ],
)
def test_refusals_carry_one_sentence(model, gpus, kwargs, message):
    result = _plan(model, gpus, **kwargs)
    assert not result.fits and message in result.reason and "\n" not in result.reason
    assert result.to_dict()["placement"] == []


def test_busy_and_max_gpus_shape_the_scheduler_view():
    profile = profile_model("meta-llama/Llama-2-7b-hf")
    inventory = Inventory.from_spec("2x8xA100-80GB")
    busy = {(0, g) for g in range(8)} | {(1, 0)}
    result = plan(profile, inventory, busy=busy, max_gpus=4)
    assert result.fits and result.gpus_used == 4 and not set(result.placement) & busy
    seventy = profile_model("meta-llama/Llama-2-70b-hf")
    spread = plan(seventy, inventory, busy={(n, g) for n in (0, 1) for g in range(7)})
    assert spread.fits and spread.layout == ParallelLayout(pp=2) and spread.placement == [(0, 7), (1, 7)]
    crowded = plan(seventy, inventory, busy={(n, g) for n in (0, 1) for g in range(8)} - {(0, 3)})
    assert (
        not crowded.fits and crowded.reason.startswith("needs 2 GPUs (tp=1, pp=2)") and "1 such GPUs" in crowded.reason
    )


def test_busy_everywhere_is_reported_as_free_gpus():
    inventory = Inventory.from_spec("8xA100-80GB")
    result = plan(profile_model("gpt2"), inventory, busy={(0, g) for g in range(8)})
    assert not result.fits and result.reason == "no GPU is free: all 8 are busy"
    half = plan(
        profile_model("meta-llama/Llama-2-70b-hf"), inventory, busy={(0, g) for g in range(6)}, strategy="single"
    )
    assert not half.fits and "the largest free GPU has 80 GB" in half.reason


def test_engine_threshold_is_configurable():
    profile = profile_model("meta-llama/Llama-3.1-8B")  # 14.96 GB of bf16 weights
    inventory = Inventory.from_spec("1xA100-80GB")
    assert plan(profile, inventory).engine == "lightweight"
    assert plan(profile, inventory, lightweight_threshold_gb=10).engine == "distributed"
    assert plan(profile, inventory, dtype="float32").engine == "distributed"


def test_pcie_node_prefers_replicas_over_tensor_parallel():
    result = _plan("meta-llama/Llama-2-13b-hf", "4xL40S")
    assert result.fits and result.layout.world_size == 1 and result.layout.dp == 4


def test_alternatives_are_ranked_fitting_layouts():
    result = _plan("meta-llama/Llama-2-70b-hf", "8xA100-80GB", alternatives=3)
    assert 1 <= len(result.alternatives) <= 3
    rates = [result.estimated_tokens_per_s] + [alt.estimated_tokens_per_s for alt in result.alternatives]
    assert rates == sorted(rates, reverse=True)
    assert all(alt.fits and alt.placement and alt.engine == result.engine for alt in result.alternatives)
    assert _plan("meta-llama/Llama-2-70b-hf", "8xA100-80GB", alternatives=0).alternatives == []


def test_max_length_is_capped_by_the_model():
    result = _plan("gpt2", "1xA10G-24GB", max_length=100_000)
    assert result.max_length == 1024 and result.fits


def test_cpu_plans():
    inventory = Inventory.cpu(total_gb=32, free_gb=30)
    small = plan(profile_model("gpt2"), inventory)
    assert small.fits and small.strategy is S.SINGLE and small.engine == "lightweight"
    assert small.placement == [(0, 0)] and small.gpus_used == 0 and small.estimated_tokens_per_s > 0
    big = plan(profile_model("meta-llama/Llama-2-70b-hf"), inventory)
    assert not big.fits and "GB of RAM on the CPU" in big.reason
    split = plan(profile_model("gpt2"), inventory, strategy="tp", tp=2)
    assert not split.fits and "strategy 'tp', tp=2" in split.reason
    assert not plan(profile_model("gpt2"), inventory, busy={(0, 0)}).fits


def test_cpu_slots_take_the_first_free_one():
    slots = Inventory([Node([GPU("cpu", 16, 16, None, CPU_SPEC)] * 3, interconnect="cpu", intra_bandwidth_gbps=0.0)])
    result = plan(profile_model("gpt2"), slots, busy={(0, 0)})
    assert result.fits and result.placement == [(0, 1)]
    assert place(ParallelLayout(), slots, busy={(0, 0), (0, 1)}) == [(0, 2)]


def test_bad_arguments_raise_planning_errors():
    profile, inventory = profile_model("gpt2"), Inventory.from_spec("8xA100-80GB")
    with pytest.raises(PlanningError, match="unknown strategy 'zigzag'"):
        plan(profile, inventory, strategy="zigzag")
    with pytest.raises(PlanningError, match="batch_size must be a positive whole number"):
        plan(profile, inventory, batch_size=0)
    with pytest.raises(PlanningError, match="unknown dtype"):
        plan(profile, inventory, dtype="fp8")
    with pytest.raises(PlanningError, match="tp must be"):
        ParallelLayout(tp=0)


def test_plan_accepts_ids_and_configs():
    assert plan("gpt2", Inventory.from_spec("1xL4")).profile.params == 124_439_808


def test_json_document_shape():
    result = _plan("meta-llama/Llama-2-70b-hf", "8xA100-80GB")
    document = json.loads(json.dumps(result.to_dict()))
    assert document["model"] == {
        "name": "meta-llama/Llama-2-70b-hf",
        "params": 68_976_648_192,
        "dtype": "bfloat16",
        "weights_gb": 128.48,
        "kv_bytes_per_token": 327_680,
        "layers": 80,
        "heads": 64,
        "kv_heads": 8,
    }
    assert document["engine"] == "distributed" and document["strategy"] == "tp"
    assert document["tp"] * document["pp"] * document["dp"] == document["gpus_used"] == len(document["placement"])
    assert set(document["per_gpu_gb"]) >= {"weights", "kv_cache", "activations", "overhead", "total"}
    assert document["fits"] is True and document["nodes_used"] == 1 and document["reason"]
    assert document["estimated_tokens_per_s"] > 0
    assert set(document["alternatives"][0]) >= {"strategy", "tp", "pp", "dp", "gpus_used", "per_gpu_gb", "fits"}


def test_strategy_enum_is_the_shared_one():
    assert DistributionStrategy is TypesStrategy
    assert ParallelLayout(2, 2, 2).strategy is S.HYBRID and ParallelLayout(2, 2, 2).total_gpus == 8
    assert ParallelLayout(dp=2).strategy is S.DATA_PARALLEL and ParallelLayout().strategy is S.SINGLE
