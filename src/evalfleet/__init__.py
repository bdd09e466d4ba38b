"""evalfleet: evaluate large language models at any scale.

The public names are re-exported here lazily, so `import evalfleet` stays cheap
(torch and lm-eval load only when an engine is used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "EvaluationRequest": "evalfleet.types",
    "EvaluationResult": "evalfleet.types",
    "ModelConfig": "evalfleet.types",
    "TaskSpec": "evalfleet.types",
    "DistributionStrategy": "evalfleet.types",
    "EvalfleetError": "evalfleet.types",
    "EvaluationEngine": "evalfleet.engines.base",
    "LightweightEvaluationEngine": "evalfleet.engines.lightweight",
    "DistributedEvaluationEngine": "evalfleet.engines.distributed",
    "DistributedEvaluationCapabilities": "evalfleet.engines.distributed",
    "MultiGPUModelLoader": "evalfleet.engines.distributed",
    "DistributedModelInfo": "evalfleet.engines.distributed",
    "select_engine": "evalfleet.engines.router",
    "estimate_model_size": "evalfleet.engines.router",
    "DistributedEvaluationOrchestrator": "evalfleet.orchestrator",
    "MultiGPUPerformanceMonitor": "evalfleet.monitoring",
    "ParallelLayout": "evalfleet.planning",
    "Inventory": "evalfleet.planning",
    "plan": "evalfleet.planning",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'evalfleet' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
