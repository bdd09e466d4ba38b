"""The path every engine shares once it has a runner: lm-eval on top, results.json out.

An engine's only job is to build a `BatchRunner` (one device, worker groups, …); from
there, task loading, `EvalfleetLM`, `simple_evaluate`, the `evalfleet` section and the
files on disk are the same for all of them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from lm_eval import simple_evaluate
from lm_eval.utils import handle_non_serializable

from evalfleet.engines.environment import gathered_environment
from evalfleet.engines.harness import lm_eval_fields, refusal, score_settings, simple_evaluate_arguments
from evalfleet.engines.task_cache import requests_cache
from evalfleet.planning import backends
from evalfleet.runtime.backends.hf import resolve_dtype, resolve_device
from evalfleet.runtime.batching import default_token_budget
from evalfleet.runtime.cache import RequestCache, default_cache_path, model_identity
from evalfleet.runtime.lm import EvalfleetLM, ProgressCallback
from evalfleet.runtime.runner import BatchRunner
from evalfleet.tasks import build_task_manager, dataset_loads_uncounted, sandboxed_templates, templates_compiled_once
from evalfleet.tasks.noise import silence_third_party_noise
from evalfleet.tasks.reachability import unreachable_dataset
from evalfleet.types import EvalfleetError, EvaluationRequest, EvaluationResult, resolve_model_path

log = logging.getLogger("evalfleet")

# lm-eval's default of 100,000 bootstrap resamples costs tens of seconds per perplexity metric;
# 1,000 gives standard errors good to about 3% and leaves every metric itself unchanged.
BOOTSTRAP_ITERS = 1000
# When the request being served began (perf_counter), set by whoever takes it in; the time from
# there to the start of lm-eval's work is the run's start-up (imports, checks, model loading).
_request_started: float | None = None


def note_request_start(at: float | None = None) -> None:
    global _request_started
    _request_started = time.perf_counter() if at is None else at


def check_output_dir(output_dir: str | None) -> Path | None:
    """Refuse an unwritable output folder before any work is done, not after."""
    if output_dir is None:
        return None
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise EvalfleetError(f"cannot create output folder '{folder}': {error.strerror or error}") from error
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise EvalfleetError(f"output folder '{folder}' is not writable")
    return folder


def load_dtype_and_device(request: EvaluationRequest) -> tuple[str, str]:
    device = resolve_device(request.model.device)
    return resolve_dtype(request.model.dtype, device), device


def evaluate_tasks(request: EvaluationRequest, lm: Any, manager: Any, *, log_samples: bool) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of the request's tasks on `lm`, with the run's settings and seeds
    (chat template, generation settings, … as lm-eval's command line passes them).

    Built requests are kept on disk beside the request cache (see `task_cache`), under every
    setting that shapes them; a dataset that cannot be reached, or a task that runs generated
    code unconfirmed, becomes one sentence. A client's tasks (`untrusted`) render their
    templates in jinja's sandbox. Loading a dataset sends no download count to the Hub.
    """
    names = list(request.tasks.names)
    built = Path(request.cache_path or default_cache_path()).parent / "lm-eval-requests"
    arguments = simple_evaluate_arguments(request)
    template = lm.chat_template(arguments["apply_chat_template"]) if arguments["apply_chat_template"] else None
    settings = {"num_fewshot": request.tasks.num_fewshot, **arguments, "chat_template": template,
                "metadata": request.harness.metadata}
    dataset_loads_uncounted()
    try:
        with (
            sandboxed_templates(request.tasks.untrusted),
            templates_compiled_once(),
            requests_cache(built, manager, names, request.tasks.limit, **settings) as reuse,
        ):
            return simple_evaluate(
                model=lm,
                tasks=names,
                cache_requests=reuse,
                num_fewshot=request.tasks.num_fewshot,
                limit=request.tasks.limit,
                task_manager=manager,
                log_samples=log_samples or request.harness.predict_only,
                bootstrap_iters=BOOTSTRAP_ITERS,
                **arguments,
            ) or {}
    except Exception as error:
        refused = refusal(error) or unreachable_dataset(error, names)
        if refused is None:
            raise
        raise refused from None


def run_evaluation(
    request: EvaluationRequest,
    runner: BatchRunner,
    tokenizer: Any,
    *,
    engine: str,
    dtype: str,
    device: str,
    model_gb: float | None = None,
    progress: ProgressCallback | None = None,
    extra: dict[str, Any] | None = None,
    monitor: Any = None,
    backend: str = "hf",
) -> EvaluationResult:
    global _request_started
    began = _request_started if _request_started is not None else time.perf_counter()
    _request_started = None
    output_dir = check_output_dir(request.output_dir)
    manager = build_task_manager(request.tasks.names, request.tasks.include_path, request.harness.metadata)
    model_path = resolve_model_path(request.model.path)
    layout = runner.describe()
    # A pipeline fills and drains once per batch, and cuts each batch into micro-batches: its
    # batches hold pp budgets, so each stage computes about a budget's share at a time. A device_map's
    # stages take the whole batch in turn: one budget.
    stages = 1 if layout.get("strategy") == "device_map" else max(1, layout.get("pp") or 1)
    token_budget = request.max_batch_tokens or default_token_budget(device) * stages
    if monitor is not None:  # its suggestions then name this run's settings, and it watches only these devices
        monitor.set_layout(tp=layout.get("tp"), pp=layout.get("pp"), dp=layout.get("dp"),
                           max_batch_tokens=token_budget, devices=layout.get("devices"))
    cache = RequestCache(request.cache_path) if request.use_cache else None
    lm = EvalfleetLM(
        runner,
        tokenizer,
        model_identity(model_path, request.model.revision, dtype, backend),
        cache=cache,
        token_budget=token_budget,
        batch_size=request.batch_size if isinstance(request.batch_size, int) else None,
        progress=progress,
        add_bos_token=request.model.add_bos_token,
        seed=request.seed[2],
        chat_template=request.harness.apply_chat_template,
        chat_template_args=request.model.chat_template_args,
    )
    runner.generation_rows = lm.max_batch_size
    silence_third_party_noise()
    started = time.perf_counter()
    try:
        with gathered_environment():
            output = evaluate_tasks(request, lm, manager, log_samples=request.log_samples)
    finally:
        if cache is not None:
            cache.close()
    finished = time.perf_counter()
    wall = finished - started
    output = dict(output or {})
    samples = output.pop("samples", None)
    output.update(lm_eval_fields(request, lm, samples))
    stats = lm.stats
    layout = runner.describe()
    section = {
        "engine": engine,
        "backend": {"name": backend, "version": layout.get("backend_version") or backends.version(backend)},
        "model": {"path": model_path, "dtype": dtype, "size_gb": model_gb},
        "settings": score_settings(request, lm, output, dtype),
        "layout": layout,
        "timing": {
            "wall_seconds": round(wall, 4),
            "compute_seconds": round(stats.compute_seconds, 4),
            "requests": stats.requests,
            "requests_by_type": stats.by_type,
            "token_requests": stats.items,
            "tokens": stats.tokens,
            "requests_per_s": round(stats.requests / wall, 3) if wall > 0 else None,
            "tokens_per_s": round(stats.tokens / wall, 3) if wall > 0 else None,
            "split": time_split(stats, began, started, finished),
            "by_kind": {
                kind: {"tokens": int(f["tokens"]), "seconds": round(f["seconds"], 4),
                       "tokens_per_s": round(f["tokens"] / f["seconds"], 1) if f["seconds"] > 0 else None}
                for kind, f in stats.by_kind.items()
            },
        },
        "cache": {
            "enabled": cache is not None,
            "hits": stats.cached,
            "misses": stats.items - stats.cached,
            "computed": stats.computed,
            "path": str(cache.path) if cache is not None else None,
        },
        **(extra or {}),
    }
    section["hardware"] = _hardware(layout)
    section["calibration"] = _calibrate(section, model_path)
    result = EvaluationResult(results=output, evalfleet=section)
    if output_dir is not None:
        result.output_path = str(write_outputs(result, samples, output_dir))
    return result


def _hardware(layout: dict[str, Any]) -> dict[str, Any]:
    """What the run computed on, for its calibration key: GPU model, or CPU threads in all."""
    import torch

    gpus = [name for name in layout.get("device_names", []) if name != "cpu"]  # as ranks elsewhere report them
    if gpus:
        return {"gpu_name": gpus[0]}
    devices = [str(d) for d in layout.get("devices") or ["cpu"]]
    if "device_names" not in layout and any(d.startswith("cuda") for d in devices) and torch.cuda.is_available():
        return {"gpu_name": torch.cuda.get_device_name(0)}  # this process holds the weights
    ranks = (layout.get("tp") or 1) * (layout.get("pp") or 1) * (layout.get("dp") or 1)
    per_rank = layout.get("threads_per_rank")
    return {"cpu_threads": per_rank * ranks if per_rank else torch.get_num_threads()}


def _calibrate(section: dict[str, Any], model_path: str) -> dict[str, Any]:
    """Keep this run's measured speeds for later estimates (planning/calibration.py); a run is
    never failed by its bookkeeping, so a problem here is logged and reported only."""
    from evalfleet.planning import profile_model
    from evalfleet.planning.calibration import Calibration, record_run

    if section["layout"].get("replica_changes"):  # its speed belongs to no single layout
        return {"kept": [], "skipped": "replicas joined or left during the run"}
    calibration = Calibration()
    try:
        kept = record_run(section, profile_model(model_path), calibration)
    except Exception as error:  # noqa: BLE001 - an unreadable config, a read-only cache folder
        log.warning("measured speeds not kept: %s", error)
        return {"kept": [], "error": str(error)}
    return {"kept": kept, "path": str(calibration.path)}


def time_split(stats: Any, began: float, started: float, finished: float) -> dict[str, float]:
    """Where the wall time went: start-up, building requests, compute, scoring (writing comes later).

    Building requests is lm-eval's task and request construction plus our own tokenization,
    cache look-ups and batching (lm-eval's time in our LM, less compute); scoring is lm-eval's
    metrics and aggregation after the last result came back.
    """
    first = stats.first_call if stats.first_call is not None else finished
    last = stats.last_return if stats.last_return is not None else first
    return {
        "startup_seconds": round(started - began, 4),
        "requests_seconds": round(max(0.0, last - started - stats.compute_seconds), 4),
        "compute_seconds": round(stats.compute_seconds, 4),
        "scoring_seconds": round(finished - last, 4),
        "writing_seconds": 0.0,
    }


def write_outputs(result: EvaluationResult, samples: dict[str, list] | None, output_dir: Path) -> Path:
    """results.json (lm-eval's document + `evalfleet`) and, if logged, samples_<task>.jsonl."""
    started = time.perf_counter()
    split = result.evalfleet.get("timing", {}).get("split")
    path = output_dir / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result.document(), indent=2, default=handle_non_serializable, ensure_ascii=False))
    tmp.replace(path)
    for task, rows in (samples or {}).items():
        with (output_dir / f"samples_{task}.jsonl").open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n")
    if split is not None:  # counted from the next write on: this one is already on disk
        split["writing_seconds"] = round(split["writing_seconds"] + time.perf_counter() - started, 4)
    return path
