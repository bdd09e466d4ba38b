"""How a vLLM replica is sized: its share of each GPU and its longest sequence from the planner's
memory model, its KV cache in bytes on the CPU, and any extra engine arguments the user gives."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from evalfleet.types import EvalfleetError, ModelConfig

# Extra vLLM engine arguments as a JSON object, e.g. {"max_num_seqs": 64} after KV-cache preemptions.
VLLM_ENGINE_ARGS_ENV = "EVALFLEET_VLLM_ENGINE_ARGS"
# The most of a GPU vLLM is given beyond what the plan needs, whatever the memory model allows.
MAX_GPU_MEMORY_UTILIZATION = 0.95


def gpu_memory_utilization(plan: Any, inventory: Any) -> float:
    """vLLM's share of each GPU: what is free less the memory model's safety margin, never less
    than the plan needs (vLLM fills what is left after the weights with KV cache)."""
    gpus = [inventory.nodes[node].gpus[gpu] for node, gpu in plan.placement]
    share = min((gpu.free_gb - plan.per_gpu.margin) / gpu.total_gb for gpu in gpus)
    need = max(plan.per_gpu.total / gpu.total_gb for gpu in gpus)
    return math.ceil(1000 * max(need, min(MAX_GPU_MEMORY_UTILIZATION, share))) / 1000  # never below the need


# The least KV cache a CPU replica gets: room for several sequences of a small model's whole context.
MIN_CPU_KV_CACHE_BYTES = 256 * 2**20


def cpu_kv_cache_bytes(model_config: ModelConfig, tp: int, pp: int) -> int:
    """The KV cache of one vLLM worker on the CPU, in bytes, from the memory model.

    Given as `kv_cache_memory_bytes`, not as `gpu_memory_utilization`: vLLM's CPU worker
    multiplies that share by the RAM of its NUMA node (8.5 of 24 GiB on some machines) and
    subtracts its own size, so a share computed against the machine's RAM asked for less than
    nothing there, and whether the engine loaded hung on the process's size at that moment.
    """
    from evalfleet.planning import estimate_memory, profile_model

    profile = profile_model(model_config.path)
    length = model_config.max_length or profile.max_positions or 2048
    need = estimate_memory(profile, tp, pp, dtype="float32", max_length=length, on_cpu=True).kv_cache
    return max(MIN_CPU_KV_CACHE_BYTES, math.ceil(need * 2**30 / 2**20) * 2**20)


def vllm_engine_args() -> dict[str, Any]:
    text = os.environ.get(VLLM_ENGINE_ARGS_ENV)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise EvalfleetError(f"{VLLM_ENGINE_ARGS_ENV} is not valid JSON: {error.msg}") from None
    if not isinstance(value, dict):
        raise EvalfleetError(f"{VLLM_ENGINE_ARGS_ENV} must be a JSON object of vLLM engine arguments")
    return value


def vllm_spec_fields(model_config: ModelConfig, tp: int, pp: int, gpu_share: float | None, max_model_len: int | None,
                     seed: int) -> dict[str, Any]:
    """The GroupSpec fields of a vLLM replica: on GPUs the plan's memory share, on the CPU its KV cache
    in bytes; the plan's length; the user's extra engine arguments (which win)."""
    engine_args = vllm_engine_args()
    if gpu_share is None:
        engine_args = {"kv_cache_memory_bytes": cpu_kv_cache_bytes(model_config, tp, pp), **engine_args}
    return {
        "backend": "vllm",
        "seed": seed,
        "gpu_memory_utilization": gpu_share,
        "max_length": model_config.max_length or max_model_len,
        "engine_args": engine_args,
    }
