"""The device_map layout: one process splits a model's layers over its devices (accelerate), as
lm-eval's `parallelize=True` does, for families transformers cannot pipeline (GPT-NeoX here).

Two CPU processes cannot share one device_map, so the split is over the CPU and the disk in one
process: the budgets put some layers on each, and the disk's weights are read back for every
forward. The numbers must be lm-eval's `hf` backend's, the layers must really be split.
"""

from __future__ import annotations

import pytest
import torch
from distributed_support import differences, run_all, single_process_reference

from evalfleet.engines.distributed import gpu_layout
from evalfleet.planning import parse_gpus, plan, profile_model
from evalfleet.runtime.backends.base import LoglikelihoodItem
from evalfleet.runtime.group import DEVICE_MAP_PATH, GroupSpec, check_layout
from evalfleet.runtime.parallel import load_part
from evalfleet.runtime.runner import InProcessRunner
from evalfleet.runtime.workers import WorkerGroupRunner
from evalfleet.types import EvalfleetError
from tinymodels import build_tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("device-map") / "tiny-neox", family="gpt_neox", layers=4)


@pytest.fixture(scope="module")
def reference(neox):
    """Requests (left-padded batches of several lengths, and generation) and the unsplit model's results."""
    return single_process_reference(neox)


def split_budgets(model) -> dict[str, int]:
    """The CPU holds about half the weights (less the room accelerate keeps to bring a disk layer back)."""
    weights = sum(path.stat().st_size for path in model.glob("*.safetensors"))
    return {"cpu": int(weights * 0.6), "disk": weights * 4}


def split_spec(model, budgets: dict[str, int]) -> GroupSpec:
    return GroupSpec(str(model), dtype="float32", device="cpu", pp=2, max_memory=budgets)


def lm_eval_scores(model, items: list[LoglikelihoodItem]) -> list[tuple[float, bool]]:
    """lm-eval's own hf backend on the same token ids (its batching and padding, not ours)."""
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(model), dtype="float32", device="cpu", batch_size=16)
    requests = [(("", ""), list(item.context), list(item.continuation)) for item in items]
    return [(float(score), bool(greedy)) for score, greedy in lm._loglikelihood_tokens(requests, disable_tqdm=True)]


def layer_devices(backend) -> set[str]:
    return {str(device) for name, device in getattr(backend.model, "hf_device_map", {}).items() if ".layers." in name}


def test_the_split_over_cpu_and_disk_equals_lm_eval_hf(neox, reference):
    batches, unsplit = reference
    spec = split_spec(neox, split_budgets(neox))
    check_layout(spec)
    part = load_part(spec)
    assert layer_devices(part.backend) == {"cpu", "disk"}, part.backend.model.hf_device_map  # really split
    assert any(len({item.length for item in batch}) > 2 for batch in batches)  # left padding at work
    results = run_all(InProcessRunner(part.backend, "cpu"), batches)

    scored = [(item, got) for batch, answers in zip(batches, results, strict=True)
              for item, got in zip(batch, answers, strict=True) if isinstance(item, LoglikelihoodItem)]
    expected = lm_eval_scores(neox, [item for item, _ in scored])
    problems = differences([expected], [[got for _, got in scored]])
    assert not problems, "\n".join(problems[:10])
    assert differences(unsplit, results) == []  # generation too, as the unsplit model (itself lm-eval's)


def test_a_worker_group_serves_the_split_in_one_process(neox, reference):
    batches, unsplit = reference
    runner = WorkerGroupRunner(split_spec(neox, split_budgets(neox)), [["cpu", "cpu"]]).start()
    try:
        assert [len(pids) for pids in runner.worker_pids()] == [1]  # two devices, one process
        placed = runner.info["ranks"][0]["device_map"]
        assert {where for name, where in placed.items() if ".layers." in name} == {"cpu", "disk"}, placed
        results = run_all(runner, batches)
        description = runner.describe()
    finally:
        runner.close()
    assert differences(unsplit, results) == []
    assert description["strategy"] == "device_map" and description["parallel_path"] == DEVICE_MAP_PATH
    assert (description["tp"], description["pp"], description["dp"]) == (1, 2, 1)


def test_limits_that_cannot_hold_the_weights_are_out_of_memory_not_a_spill(neox):
    weights = sum(path.stat().st_size for path in neox.glob("*.safetensors"))
    with pytest.raises(torch.OutOfMemoryError, match="would spill to disk"):
        load_part(split_spec(neox, {"cpu": weights // 2}))


def test_a_device_map_needs_two_devices_and_no_tensor_parallelism(neox):
    with pytest.raises(EvalfleetError, match="2 to 4 devices"):
        check_layout(GroupSpec(str(neox), pp=5, max_memory={"cpu": 10**9}))


def test_the_plan_gives_each_gpu_its_weights_limit():
    """Falcon-180B on 8 A100s: every GPU of the replica may take its free memory less what the memory
    model keeps for the KV cache, activations, overhead and margin; together they hold the weights."""
    inventory = parse_gpus("8xA100-80GB")
    found = plan(profile_model("tiiuae/falcon-180B"), inventory, backend="hf")
    layout = gpu_layout(found, inventory)
    assert layout.device_map and layout.strategy.value == "device_map" and len(layout.devices) == 1
    assert len(layout.device_map_budgets) == len(layout.devices[0]) == found.layout.pp
    reserve = found.per_gpu.total - found.per_gpu.weights
    free = inventory.nodes[0].gpus[0].free_gb
    assert all(budget == int((free - reserve) * 2**30) for budget in layout.device_map_budgets)
    assert sum(layout.device_map_budgets) > found.profile.weight_bytes("bfloat16")


def test_the_cpu_and_ray_refuse_a_device_map_in_one_sentence(neox):
    from evalfleet.engines.distributed import cpu_layout
    from evalfleet.engines.ray_engine import ray_layout
    from evalfleet.types import DistributionStrategy, EvaluationRequest

    with pytest.raises(EvalfleetError, match="the CPU is one device"):
        cpu_layout(DistributionStrategy.DEVICE_MAP, None, None, None)
    request = EvaluationRequest.model_validate({"model": {"path": str(neox)}, "tasks": {"names": "demo_mc"},
                                                "strategy": "device_map"})
    with pytest.raises(EvalfleetError, match="not on Ray"):
        ray_layout(request)
