"""One request, start to finish: choose the engine, evaluate, attach the monitoring summary.

Shared by `evalfleet run` and the orchestrator's workers, so both produce the same files.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from evalfleet.engines.environment import start_gathering
from evalfleet.engines.evaluation import check_output_dir, load_dtype_and_device, note_request_start, write_outputs
from evalfleet.engines.router import estimate_model_size, select_engine
from evalfleet.engines.wandb_log import log_to_wandb
from evalfleet.runtime.backends.hf import check_model_folder
from evalfleet.runtime.lm import ProgressCallback
from evalfleet.monitoring import MultiGPUPerformanceMonitor
from evalfleet.types import (
    STARTED_AT_VARIABLE,
    EvalfleetError,
    EvaluationRequest,
    EvaluationResult,
    UsageError,
    resolve_model_path,
)

MONITOR_INTERVAL = 0.5
_first_request = True


def note_start() -> None:
    """The request this process serves starts now, or, the first time, with the process (its imports
    are start-up too), or when a scheduler handed the job to it (`STARTED_AT_VARIABLE`)."""
    global _first_request
    began = time.perf_counter()
    if _first_request:
        handed = os.environ.get(STARTED_AT_VARIABLE)
        began -= max(0.0, time.time() - (float(handed) if handed else psutil.Process().create_time()))
    _first_request = False
    note_request_start(began)


def check_request(
    request: EvaluationRequest, ranks_backend: str | None = None, *, local: bool = True
) -> EvaluationRequest:
    """Every check that needs no model loaded, so a bad input costs seconds, not a model load.

    Returns the request with its backend resolved (`auto` becomes hf or vllm). `ranks_backend`:
    the backend already resolved, and checked, where the ranks run (a Ray cluster's nodes).
    `local`: the weights live on this machine, so its device answers for the device and dtype.
    """
    from evalfleet.planning import profile_model
    from evalfleet.planning.backends import device_problem, resolve_backend
    from evalfleet.engines.harness import check_samples
    from evalfleet.tasks import build_task_manager

    path = resolve_model_path(request.model.path)
    check_model_folder(path)
    if request.harness.apply_chat_template and Path(path).is_dir():
        check_chat_template(request, path)
    on_gpu = False
    if local:  # ranks elsewhere decide their device, and check the dtype against it, as they load
        _, device = load_dtype_and_device(request)
        on_gpu = device.startswith("cuda")
    backend = ranks_backend or resolve_backend(request.backend, on_gpu=on_gpu)
    if backend == "vllm" and request.engine == "lightweight":
        raise EvalfleetError("the lightweight engine runs transformers only; use --engine auto with --backend vllm")
    problem = None if ranks_backend else device_problem(backend, profile_model(request.model.path).head_dim,
                                                         on_cpu=not on_gpu)
    if problem:
        raise UsageError(problem)
    check_output_dir(request.output_dir)
    check_samples(request, build_task_manager(request.tasks.names, request.tasks.include_path, request.harness.metadata))
    return request.model_copy(update={"backend": backend})


def check_chat_template(request: EvaluationRequest, path: str) -> None:
    """The model's tokenizer has the chat template asked for (its tokenizer only, before the model loads)."""
    from evalfleet.runtime.backends.hf import load_tokenizer
    from evalfleet.runtime.chat import select_template

    tokenizer = load_tokenizer(path, request.model.revision, request.model.trust_remote_code)
    select_template(tokenizer, request.harness.apply_chat_template, request.model.path)


def evaluate_request(
    request: EvaluationRequest, progress: ProgressCallback | None = None, report: bool = False,
    on_runner: Callable[[Any], None] | None = None,
) -> EvaluationResult:
    note_start()
    request = check_request(request)
    start_gathering()  # lm-eval's environment report, while the model loads
    engine = select_engine(request)
    if not engine.can_handle_request(request):
        size = estimate_model_size(request.model)
        capabilities = engine.get_capabilities()
        raise EvalfleetError(
            f"the {engine.name} engine cannot run this model ({size:.1f} GB of weights); "
            f"it can place at most {capabilities.max_model_gb:.1f} GB here"
        )
    engine.progress = progress
    engine.on_runner = on_runner
    with MultiGPUPerformanceMonitor(interval=MONITOR_INTERVAL) as monitor:
        engine.monitor = monitor
        result = asyncio.run(engine.evaluate(request))
    result.evalfleet["monitoring"] = monitor.summary()
    if result.output_path is not None:
        folder = Path(result.output_path).parent
        write_outputs(result, None, folder)
        if report:
            monitor.write_report(folder, png=True)
        if request.wandb_args is not None:
            log_to_wandb(request.wandb_args, result.document(), folder if request.log_samples else None)
    monitor.close()
    return result
