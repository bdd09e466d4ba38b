"""The path every engine shares once it has a runner: lm-eval on top, results.json out.

An engine's only job is to build a `BatchRunner` (one device, worker groups, …); from
there, task loading, `EvalfleetLM`, `simple_evaluate`, the `evalfleet` section and the
files on disk are the same for all of them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from lm_eval import simple_evaluate
from lm_eval.utils import handle_non_serializable

from evalfleet.planning import backends
from evalfleet.runtime.backends.hf import resolve_dtype, resolve_device
from evalfleet.runtime.batching import default_token_budget
from evalfleet.runtime.cache import RequestCache, model_identity
from evalfleet.runtime.lm import EvalfleetLM, ProgressCallback
from evalfleet.runtime.runner import BatchRunner
from evalfleet.tasks import build_task_manager
from evalfleet.types import EvalfleetError, EvaluationRequest, EvaluationResult, resolve_model_path

# lm-eval's default of 100,000 bootstrap resamples costs tens of seconds per perplexity metric;
# 1,000 gives standard errors good to about 3% and leaves every metric itself unchanged.
BOOTSTRAP_ITERS = 1000
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
    backend: str = "hf",
) -> EvaluationResult:
    output_dir = check_output_dir(request.output_dir)
    manager = build_task_manager(request.tasks.names, request.tasks.include_path)
    model_path = resolve_model_path(request.model.path)
    cache = RequestCache(request.cache_path) if request.use_cache else None
    lm = EvalfleetLM(
        runner,
        tokenizer,
        model_identity(model_path, request.model.revision, dtype, backend),
        cache=cache,
        token_budget=request.max_batch_tokens or default_token_budget(device),
        batch_size=request.batch_size if isinstance(request.batch_size, int) else None,
        progress=progress,
        seed=request.seed,
    )
    started = time.perf_counter()
    try:
        output = simple_evaluate(
            model=lm,
            tasks=list(request.tasks.names),
            num_fewshot=request.tasks.num_fewshot,
            limit=request.tasks.limit,
            task_manager=manager,
            log_samples=request.log_samples,
            bootstrap_iters=BOOTSTRAP_ITERS,
            random_seed=request.seed,
            numpy_random_seed=request.seed,
            torch_random_seed=request.seed,
            fewshot_random_seed=request.seed,
        )
    finally:
        if cache is not None:
            cache.close()
    wall = time.perf_counter() - started
    output = dict(output or {})
    samples = output.pop("samples", None)
    stats = lm.stats
    layout = runner.describe()
    section = {
        "engine": engine,
        "backend": {"name": backend, "version": layout.get("backend_version") or backends.version(backend)},
        "model": {"path": model_path, "dtype": dtype, "size_gb": model_gb},
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
    result = EvaluationResult(results=output, evalfleet=section)
    if output_dir is not None:
        result.output_path = str(write_outputs(result, samples, output_dir))
    return result


def write_outputs(result: EvaluationResult, samples: dict[str, list] | None, output_dir: Path) -> Path:
    """results.json (lm-eval's document + `evalfleet`) and, if logged, samples_<task>.jsonl."""
    path = output_dir / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result.document(), indent=2, default=handle_non_serializable, ensure_ascii=False))
    tmp.replace(path)
    for task, rows in (samples or {}).items():
        with (output_dir / f"samples_{task}.jsonl").open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return path
