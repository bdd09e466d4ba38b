"""How a vLLM replica is sized: its share of each GPU and its longest sequence from the planner's
memory model, its share of RAM on the CPU, and any extra engine arguments the user gives."""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any

from evalfleet.types import EvalfleetError, ModelConfig

if TYPE_CHECKING:
    from evalfleet.engines.distributed.loader import WorkerLayout

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


def cpu_memory_share(model_config: ModelConfig, world_size: int) -> float:
    """On the CPU vLLM reserves `gpu_memory_utilization` of the machine's RAM: the memory model's
    need for one replica (weights, KV cache, activations) and a GiB of headroom, not vLLM's 92%."""
    import psutil

    from evalfleet.planning import estimate_memory, profile_model

    profile = profile_model(model_config.path)
    length = model_config.max_length or profile.max_positions or 2048
    need = estimate_memory(profile, dtype="float32", max_length=length, on_cpu=True).total * world_size + 1.0
    return round(min(0.5, need * 2**30 / psutil.virtual_memory().total), 4)


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


def vllm_spec_fields(model_config: ModelConfig, layout: WorkerLayout, seed: int) -> dict[str, Any]:
    """The GroupSpec fields of a vLLM replica: memory share and length from the plan, extra engine args."""
    share = layout.gpu_memory_utilization
    if share is None:
        share = cpu_memory_share(model_config, layout.tp * layout.pp)
    return {
        "backend": "vllm",
        "seed": seed,
        "gpu_memory_utilization": share,
        "max_length": model_config.max_length or layout.max_model_len,
        "engine_args": vllm_engine_args(),
    }
