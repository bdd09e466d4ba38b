"""Which engine runs a request: small models on one device, large or split ones distributed.

The size comes from the planner's profile of config.json (no weights are read). A model
goes to the lightweight engine when it fits one device with margin: on a GPU the
specification's 15 GB of weights (set `EVALFLEET_LIGHTWEIGHT_MAX_GB` to change it), on
the CPU half of the machine's memory.
"""

from __future__ import annotations

import os

from evalfleet.engines.base import EvaluationEngine
from evalfleet.engines.capacity import device_memory_gb, estimate_model_size
from evalfleet.types import DistributionStrategy, EvaluationRequest

__all__ = ["estimate_model_size", "lightweight_threshold_gb", "select_engine", "wants_distribution"]

GPU_LIGHTWEIGHT_MAX_GB = 15.0


def lightweight_threshold_gb(device: str) -> float:
    explicit = os.environ.get("EVALFLEET_LIGHTWEIGHT_MAX_GB")
    if explicit:
        return float(explicit)
    if device.startswith("cuda"):
        return min(GPU_LIGHTWEIGHT_MAX_GB, device_memory_gb(device))
    return device_memory_gb(device) / 2


def wants_distribution(request: EvaluationRequest) -> bool:
    """An explicit multi-device strategy or degree sends a request to the distributed engine."""
    split = request.strategy not in (DistributionStrategy.AUTO, DistributionStrategy.SINGLE)
    return split or max(request.tp or 1, request.pp or 1, request.dp or 1) > 1


def select_engine(request: EvaluationRequest) -> EvaluationEngine:
    """The engine for `request`: the user's choice, else the model's size decides.

    vLLM always runs as worker groups (one engine process per replica), so it takes the distributed engine.
    """
    from evalfleet.engines.evaluation import load_dtype_and_device
    from evalfleet.engines.lightweight import LightweightEvaluationEngine

    if request.engine == "lightweight":
        return LightweightEvaluationEngine()
    if request.engine == "auto" and request.backend != "vllm" and not wants_distribution(request):
        _, device = load_dtype_and_device(request)
        if estimate_model_size(request.model) <= lightweight_threshold_gb(device):
            return LightweightEvaluationEngine()
    from evalfleet.engines.distributed import DistributedEvaluationEngine

    return DistributedEvaluationEngine()
