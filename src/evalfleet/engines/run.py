"""One request, start to finish: choose the engine, evaluate, attach the monitoring summary.

Shared by `evalfleet run` and the orchestrator's workers, so both produce the same files.
"""

from __future__ import annotations

import asyncio

from evalfleet.engines.router import estimate_model_size, select_engine
from evalfleet.runtime.lm import ProgressCallback
from evalfleet.types import EvalfleetError, EvaluationRequest, EvaluationResult


def evaluate_request(
    request: EvaluationRequest, progress: ProgressCallback | None = None, report: bool = False
) -> EvaluationResult:
    engine = select_engine(request)
    if not engine.can_handle_request(request):
        size = estimate_model_size(request.model)
        capabilities = engine.get_capabilities()
        raise EvalfleetError(
            f"the {engine.name} engine cannot run this model ({size:.1f} GB of weights); "
            f"it can place at most {capabilities.max_model_gb:.1f} GB here"
        )
    engine.progress = progress
    return asyncio.run(engine.evaluate(request))
