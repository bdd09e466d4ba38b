"""How a vLLM replica is sized and pinned, without starting one: the planner's memory model
becomes gpu_memory_utilization and max_model_len, and replicas get disjoint CPU cores."""

from __future__ import annotations

import pytest

from evalfleet.engines.distributed.loader import gpu_layout
from evalfleet.engines.distributed.vllm_layout import cpu_memory_share, vllm_engine_args
from evalfleet.planning import Inventory, plan, profile_model
from evalfleet.runtime.vllm_worker import cpu_binding
from evalfleet.types import EvalfleetError, ModelConfig


def test_gpu_memory_share_and_length_come_from_the_plan():
    inventory = Inventory.from_spec("8xA100-80GB")
    found = plan(profile_model("meta-llama/Llama-2-70b-hf"), inventory, max_length=4096, backend="hf")
    layout = gpu_layout(found, inventory)
    assert layout.max_model_len == 4096
    need, free = found.per_gpu.total / 80, (80 - found.per_gpu.margin) / 80
    assert layout.gpu_memory_utilization == pytest.approx(max(need, min(0.95, free)), abs=1e-3)
    assert layout.gpu_memory_utilization >= need
    small = gpu_layout(plan(profile_model("meta-llama/Llama-2-7b-hf"), inventory, backend="hf"), inventory)
    assert small.gpu_memory_utilization == 0.95  # room to spare: vLLM gets all but the margin, capped


def test_cpu_share_covers_the_model_and_stays_small(tmp_path):
    share = cpu_memory_share(ModelConfig(path="demo"), 1)
    assert 0 < share < 0.5
    assert cpu_memory_share(ModelConfig(path="demo"), 2) > share


@pytest.mark.parametrize("replica, world, threads, cores, expected", [
    (0, 1, 2, [0, 1], "0,1"),
    (0, 1, 1, [0, 1], "0"),
    (1, 1, 1, [0, 1], "1"),
    (0, 2, 1, [0, 1], "0|1"),
    (1, 2, 2, [0, 1, 2, 3, 4, 5, 6, 7], "4,5|6,7"),
])
def test_replicas_and_vllm_ranks_get_disjoint_cores(replica, world, threads, cores, expected):
    assert cpu_binding(replica, world, threads, cores) == expected


def test_extra_engine_arguments_are_a_json_object(monkeypatch):
    monkeypatch.setenv("EVALFLEET_VLLM_ENGINE_ARGS", '{"max_num_seqs": 64}')
    assert vllm_engine_args() == {"max_num_seqs": 64}
    for bad in ("[1]", "{oops"):
        monkeypatch.setenv("EVALFLEET_VLLM_ENGINE_ARGS", bad)
        with pytest.raises(EvalfleetError, match="EVALFLEET_VLLM_ENGINE_ARGS"):
            vllm_engine_args()
