"""One request, start to finish: choose the engine, evaluate, attach the monitoring summary.

Shared by `evalfleet run` and the orchestrator's workers, so both produce the same files.
"""

from __future__ import annotations

import asyncio

from evalfleet.engines.evaluation import check_output_dir, load_dtype_and_device, resolve_model_path
from evalfleet.engines.router import estimate_model_size, select_engine
from evalfleet.runtime.backends.hf import check_model_folder
from evalfleet.runtime.lm import ProgressCallback
from evalfleet.types import EvalfleetError, EvaluationRequest, EvaluationResult


def check_request(request: EvaluationRequest) -> None:
    """Every check that needs no model loaded, so a bad input costs seconds, not a model load."""
    from evalfleet.tasks import build_task_manager

    check_model_folder(resolve_model_path(request.model.path))
    load_dtype_and_device(request)
    check_output_dir(request.output_dir)
    build_task_manager(request.tasks.names, request.tasks.include_path)


def evaluate_request(
    request: EvaluationRequest, progress: ProgressCallback | None = None, report: bool = False
) -> EvaluationResult:
    check_request(request)
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
