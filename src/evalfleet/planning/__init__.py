"""The planner: from a config.json and a GPU inventory to a parallel layout, its placement and memory.

Pure arithmetic over a model profile and an inventory: no weights, no GPU, milliseconds per plan.
"""

from evalfleet.planning.allocation import PlacementError, place
from evalfleet.planning.hardware import GPU, GPU_SPECS, GPUSpec, Inventory, Node, parse_gpus
from evalfleet.planning.memory import MemoryBreakdown, estimate_memory
from evalfleet.planning.model_profile import (
    DTYPE_BYTES,
    ModelProfile,
    PlanningError,
    estimate_weights_gb,
    profile_model,
    shipped_models,
)
from evalfleet.planning.planner import Plan, plan
from evalfleet.planning.strategy import DistributionStrategy, ParallelLayout

__all__ = [
    "DTYPE_BYTES",
    "GPU",
    "GPU_SPECS",
    "DistributionStrategy",
    "GPUSpec",
    "Inventory",
    "MemoryBreakdown",
    "ModelProfile",
    "Node",
    "ParallelLayout",
    "PlacementError",
    "Plan",
    "PlanningError",
    "estimate_memory",
    "estimate_weights_gb",
    "parse_gpus",
    "place",
    "plan",
    "profile_model",
    "shipped_models",
]
