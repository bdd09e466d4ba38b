"""The distributed engine: worker groups laid out by the planner (tensor, pipeline, hybrid, data parallel)."""

from evalfleet.engines.distributed.engine import DistributedEvaluationCapabilities, DistributedEvaluationEngine
from evalfleet.engines.distributed.loader import (
    DistributedModelInfo,
    MultiGPUModelLoader,
    WorkerLayout,
    cpu_layout,
    gpu_layout,
    next_larger_plan,
)

__all__ = [
    "DistributedEvaluationCapabilities",
    "DistributedEvaluationEngine",
    "DistributedModelInfo",
    "MultiGPUModelLoader",
    "WorkerLayout",
    "cpu_layout",
    "gpu_layout",
    "next_larger_plan",
]
