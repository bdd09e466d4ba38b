"""How a vLLM replica is sized and pinned, without starting one: the planner's memory model
becomes gpu_memory_utilization and max_model_len on GPUs and the KV cache in bytes on the CPU,
and replicas get disjoint CPU cores."""

from __future__ import annotations

import pytest

from evalfleet.engines.distributed.loader import gpu_layout
from evalfleet.engines.distributed.vllm_layout import (
    MIN_CPU_KV_CACHE_BYTES,
    cpu_kv_cache_bytes,
    vllm_engine_args,
    vllm_spec_fields,
)
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


def test_cpu_kv_cache_is_bytes_from_the_memory_model_whatever_the_memory_node(monkeypatch):
    import psutil

    fields = vllm_spec_fields(ModelConfig(path="demo"), 1, 1, None, None, seed=0)
    assert fields["gpu_memory_utilization"] is None  # vLLM would take a share of its NUMA node's RAM
    small = fields["engine_args"]["kv_cache_memory_bytes"]
    assert small == MIN_CPU_KV_CACHE_BYTES  # the demo model's cache is far below the floor
    big = ModelConfig(path="meta-llama/Llama-2-7b-hf", max_length=4096)
    one, two = cpu_kv_cache_bytes(big, 1, 1), cpu_kv_cache_bytes(big, 2, 1)
    assert one > 4 * MIN_CPU_KV_CACHE_BYTES and one % 2**20 == 0 and abs(one - 2 * two) <= 2**20  # tp halves it
    for total_gib in (8.5, 24, 1024):  # a small memory node or a large machine: the same bytes
        monkeypatch.setattr(psutil, "virtual_memory", lambda t=total_gib: type("M", (), {"total": int(t * 2**30)})())
        assert cpu_kv_cache_bytes(big, 1, 1) == one
    on_gpus = vllm_spec_fields(big, 1, 1, 0.9, 4096, 0)  # on GPUs the plan's share; no bytes
    assert on_gpus["gpu_memory_utilization"] == 0.9 and "kv_cache_memory_bytes" not in on_gpus["engine_args"]
    monkeypatch.setenv("EVALFLEET_VLLM_ENGINE_ARGS", '{"kv_cache_memory_bytes": 123456789}')  # the user's word wins
    assert vllm_spec_fields(big, 1, 1, None, 4096, 0)["engine_args"] == {"kv_cache_memory_bytes": 123456789}


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
