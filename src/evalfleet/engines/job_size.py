"""A job's real size, counted at submit without running the model.

lm-eval builds the job's requests exactly as a run builds them (same tasks, few-shot count,
limit and seeds, through `evaluation.evaluate_tasks`), and `EvalfleetLM` turns them into
token-level items with the model's own tokenizer, exactly as a run does; a runner that computes
nothing records the items. So the counts are the run's: requests by type as lm-eval makes
them, and the tokens the run will compute (each distinct item once: context and continuation
for log-likelihoods, context plus the `max_gen_toks` budget for generation).

A count is kept as a small JSON file beside the request cache (or in `$EVALFLEET_SIZES`), under a hash of everything it
depends on: the task files (evalfleet's demo tasks and the include folder, with every absolute
path they mention), the tokenizer's files by content (so the checkpoints of a training run share a count),
lm-eval's version and the settings. Submitting the
same tasks for the same tokenizer again reads that file and imports nothing heavy. A job from
an HTTP client is counted in a worker process (`job_size_worker.py`), never in the web server's.

Where a count cannot be made (a model that is not a local folder, tasks that cannot be built here),
the size is modeled: 2,000 requests of 512 tokens per task (or `limit` requests), and says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from evalfleet.engines.task_cache import file_stat, mentioned_files
from evalfleet.runtime.backends.base import GenerationItem, Item
from evalfleet.runtime.cache import default_cache_path
from evalfleet.runtime.runner import BatchCallback, BatchRunner
from evalfleet.tasks import DEMO_TASKS_DIR
from evalfleet.types import EvaluationRequest, UsageError, resolve_model_path

# Bumped when what a count holds, or how it is made, changes: older files are then not read.
SIZE_VERSION = 4  # 2: work_tokens_by_kind; 3: lm-eval's chat, generation and seed settings in the key;
# 4: the tokenizer's files by content
COUNT_TIMEOUT_S = 600.0
_counting = threading.Lock()
TOKENIZER_FILES = ("tokenizer*", "*.model", "vocab*", "merges*", "special_tokens_map*", "added_tokens*", "config.json",
                   "chat_template*", "additional_chat_templates/*")


class NotCounted(Exception):
    """The job cannot be counted here; the reason says why (its size is then modeled)."""


class CountingRunner(BatchRunner):
    """Computes nothing: records every item and answers with placeholders (never cached)."""

    def __init__(self, max_length: int) -> None:
        self._max_length = max_length
        self.items: list[Item] = []

    @property
    def max_length(self) -> int:
        return self._max_length

    def run(self, batches: Sequence[Sequence[Item]], on_batch_done: BatchCallback) -> None:
        for index, batch in enumerate(batches):
            self.items.extend(batch)
            on_batch_done(index, ["" if isinstance(item, GenerationItem) else (0.0, False) for item in batch])


def _files(folder: Path) -> list[list[Any]]:
    """Every file under `folder`, and every file its task YAMLs name by absolute path."""
    found = {p for p in folder.rglob("*") if p.is_file()}
    for yaml in [p for p in found if p.suffix in (".yaml", ".yml")]:
        found |= mentioned_files(yaml)
    return [file_stat(p) for p in sorted(found)]


def _contents(model: Path, files: list[Path]) -> list[list[str]]:
    """Each tokenizer file by its name in the model folder and a hash of its bytes (small files)."""
    return [[p.relative_to(model).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest()] for p in files]


def size_key(request: EvaluationRequest) -> str:
    """The hash a count is kept under: the task files by name, size and modification time, the tokenizer's
    files (and config.json) by content, so that the checkpoints of one training run, or copies of a
    model, which share a tokenizer, share one count."""
    folders = [DEMO_TASKS_DIR] + ([Path(request.tasks.include_path).expanduser()] if request.tasks.include_path else [])
    model = Path(resolve_model_path(request.model.path))
    tokenizer = sorted({p for pattern in TOKENIZER_FILES for p in model.glob(pattern) if p.is_file()})
    described = [
        SIZE_VERSION, version("lm_eval"), list(request.tasks.names), request.tasks.limit, request.tasks.num_fewshot,
        request.seed, request.model.max_length, request.model.revision, request.model.add_bos_token,
        request.model.chat_template_args, request.harness.model_dump(),
        [_files(folder) for folder in folders if folder.is_dir()], _contents(model, tokenizer),
    ]
    return hashlib.sha256(json.dumps(described, default=str).encode()).hexdigest()[:24]


def sizes_folder(request: EvaluationRequest) -> Path:
    """`$EVALFLEET_SIZES`, else `job-sizes/` beside the request's cache."""
    explicit = os.environ.get("EVALFLEET_SIZES")
    if explicit:
        return Path(explicit).expanduser()
    return Path(request.cache_path or default_cache_path()).parent / "job-sizes"


def count_request(request: EvaluationRequest) -> dict[str, Any]:
    """Count the request's requests and tokens now (lm-eval and the tokenizer, no model).

    A client's tasks (`untrusted`) are counted in a worker process of their own: building them
    runs lm-eval's task code, which must never run inside the web server.
    """
    path = resolve_model_path(request.model.path)
    if not Path(path).is_dir():  # before any import: a hub id is answered at once
        raise NotCounted("the model is not a local folder, so its tokenizer cannot be read here")
    if request.tasks.untrusted:
        return _count_in_worker(request)
    return count_here(request)


def count_here(request: EvaluationRequest) -> dict[str, Any]:
    """Count in this process: the CLI's way (full lm-eval power for the local user), and the worker's."""
    with _counting:  # one count at a time per process: lm-eval's module-level hooks are swapped
        return _count(request, resolve_model_path(request.model.path))


def _count_in_worker(request: EvaluationRequest) -> dict[str, Any]:
    """`python -m evalfleet.engines.job_size_worker`: the request as JSON in, one JSON answer out."""
    try:
        done = subprocess.run([sys.executable, "-m", "evalfleet.engines.job_size_worker"], capture_output=True,
                              input=request.model_dump_json(), text=True, timeout=COUNT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise NotCounted(f"counting took longer than {COUNT_TIMEOUT_S:.0f} s") from None
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        said = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        raise NotCounted(f"the counting process failed: {said[-1][:300]}") from None
    if "refused" in answer:
        raise UsageError(answer["refused"])
    if "not_counted" in answer:
        raise NotCounted(answer["not_counted"])
    return answer["size"]


def _count(request: EvaluationRequest, path: str) -> dict[str, Any]:
    from jinja2.exceptions import SecurityError
    from transformers import AutoConfig

    from evalfleet.engines.environment import no_environment
    from evalfleet.engines.evaluation import evaluate_tasks
    from evalfleet.engines.harness import check_samples
    from evalfleet.runtime.backends.hf import load_tokenizer, model_max_length
    from evalfleet.runtime.lm import EvalfleetLM, work_kind
    from evalfleet.tasks import build_task_manager
    from evalfleet.tasks.noise import silence_third_party_noise

    manager = build_task_manager(request.tasks.names, request.tasks.include_path, request.harness.metadata)
    started = time.perf_counter()
    try:
        model = request.model
        tokenizer = load_tokenizer(path, model.revision, model.trust_remote_code)
        config = AutoConfig.from_pretrained(path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as error:
        raise NotCounted(f"the tokenizer could not be read: {str(error).strip().splitlines()[0]}") from None
    runner = CountingRunner(model_max_length(config, tokenizer, model.max_length))
    lm = EvalfleetLM(runner, tokenizer, "counting", add_bos_token=model.add_bos_token, seed=request.seed[2],
                     chat_template=request.harness.apply_chat_template, chat_template_args=model.chat_template_args)
    silence_third_party_noise()
    try:
        # lm-eval's and datasets' progress bars would fill a `submit`'s terminal
        with no_environment(), contextlib.redirect_stderr(io.StringIO()):
            check_samples(request, manager)
            evaluate_tasks(request, lm, manager, log_samples=False)
    except UsageError:
        raise
    except SecurityError as error:  # a client's template, in jinja's sandbox (`tasks.sandboxed_templates`)
        raise UsageError(f"a task template reaches beyond its document: {error}") from None
    except Exception as error:  # noqa: BLE001 - a dataset out of reach, a task that needs the network, …
        reason = " ".join(str(error).split()) or type(error).__name__
        raise NotCounted(f"the tasks could not be built here: {reason[:300]}") from None
    budget = sum(item.max_new_tokens for item in runner.items if isinstance(item, GenerationItem))
    prompt = sum(item.length for item in runner.items) - budget
    by_kind: dict[str, int] = {}
    for item in runner.items:
        kind = work_kind(item)
        by_kind[kind] = by_kind.get(kind, 0) + item.length
    return {
        "source": "counted",
        "requests": lm.stats.requests,
        "requests_by_type": dict(sorted(lm.stats.by_type.items())),
        "token_requests": len(runner.items),
        "prompt_tokens": prompt,
        "generation_tokens": budget,
        "work_tokens": prompt + budget,
        "work_tokens_by_kind": dict(sorted(by_kind.items())),
        "max_length": runner.max_length,
        "count_seconds": round(time.perf_counter() - started, 3),
    }


MODELED = "2,000 requests of 512 tokens per task (or --limit requests), before any count"


def estimate_work_tokens(task_count: int, limit: int | None, tokens_per_request: int = 512,
                         requests_per_task: int = 2000) -> float:
    """Tokens a request will compute before lm-eval has built its requests (refined by progress)."""
    return float(task_count * (limit or requests_per_task) * tokens_per_request)


def _modeled(request: EvaluationRequest, reason: str) -> dict[str, Any]:
    return {"source": "modeled", "reason": reason, "model": MODELED,
            "work_tokens": estimate_work_tokens(len(request.tasks.names), request.tasks.limit)}


def job_size(request: EvaluationRequest) -> dict[str, Any]:
    """The request's counted size (from the kept count when there is one), else its modeled size
    and why it is not counted (`source` says which; both give `work_tokens`).

    A wrong request (an unknown task, a malformed task folder) raises `UsageError`; anything
    else that stops the count gives the modeled size.
    """
    try:
        key = size_key(request)
    except OSError as error:
        return _modeled(request, f"the task or model files could not be read: {error}")
    kept = sizes_folder(request) / f"{key}.json"
    if kept.is_file():
        try:
            return {**json.loads(kept.read_text()), "kept": True}
        except (OSError, ValueError):
            pass  # a torn or unreadable file: count again
    try:
        size = count_request(request)
    except NotCounted as reason:
        return _modeled(request, str(reason))
    kept.parent.mkdir(parents=True, exist_ok=True)
    partial = kept.with_suffix(f".{time.time_ns()}.tmp")
    partial.write_text(json.dumps(size))
    partial.replace(kept)
    return {**size, "kept": False}
