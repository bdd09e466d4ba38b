"""`evalfleet worker`: the process that runs one job, launched by the `LocalExecutor`.

The worker, not the scheduler, knows how far it got, so it confirms its own start
(placed -> running), reports progress and heartbeats, and records its result
(running -> succeeded). On an error it records its one-sentence account and an exit report
(the failure's class and any device evidence, see `failures.py`) and exits non-zero; what
happens next (retry with backoff, or give up) is the scheduler's call.
Every finished request is already in the request cache, so a retry resumes there.

The store failing (locked past its busy timeout, a full disk) never fails the job by itself:
a progress or heartbeat write that fails is skipped (the next one catches up), and the
result is committed with retries, then left to the scheduler's retry (`StorageFault`).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from evalfleet.orchestrator.executors.local import THREADS_VARIABLE
from evalfleet.orchestrator.failures import DeviceWatch, StorageFault, exit_report, storage_fault
from evalfleet.orchestrator.live_replicas import LiveReplicas
from evalfleet.orchestrator.states import JobState
from evalfleet.orchestrator.store import JobRecord, JobStore
from evalfleet.types import EvalfleetError, EvaluationRequest, EvaluationResult, UsageError

RESULTS_FOLDER = "results"
PROGRESS_BUSY_TIMEOUT_S = 1.0
COMMIT_ATTEMPTS = 4
COMMIT_BACKOFF_S = 2.0
"""The result's commit waits out a busy store this many times (each after the store's busy
timeout), sleeping this long and then twice as long each time, before the job is left to the
scheduler's retry."""


def job_output_dir(db_path: str | os.PathLike[str], job_id: str) -> Path:
    """Where a job's results.json goes: next to the store, one folder per job."""
    return Path(db_path).expanduser().resolve().parent / RESULTS_FOLDER / job_id


def job_request(record: JobRecord, db_path: str | os.PathLike[str]) -> EvaluationRequest:
    """The job's request with its output folder, and the layout of the devices it was given.

    A layout change never changes cache keys, so a retry on fewer or more GPUs resumes too.
    """
    fields = dict(record.request)
    fields["output_dir"] = fields.get("output_dir") or str(job_output_dir(db_path, record.id))
    if record.placement and len(record.placement) > 1 and record.demand:
        fields.update(_given_layout(record))
    return EvaluationRequest.model_validate(fields)


def _given_layout(record: JobRecord) -> dict[str, int]:
    """The tp, pp and dp of the devices the job was given (its replica shape, as many as fit)."""
    tp, pp = record.demand["tp"], record.demand["pp"]
    return {"tp": tp, "pp": pp, "dp": max(1, len(record.placement or ()) // (tp * pp))}


def resizable(record: JobRecord) -> bool:
    """Whether the job can use more than one replica, so its width may change while it runs."""
    return bool(record.demand) and len(record.demand["tokens_per_s"]) > 1


@dataclass(frozen=True)
class ProgressSnapshot:
    done: int
    total: int | None
    tokens_per_s: float | None
    requests_per_s: float | None
    progress_at: float | None = None
    """Wall time at which this attempt's computed requests last moved (None before the first batch)."""
    slowest_batch_s: float | None = None
    """The longest gap between two such moves in the current kind of request: its slowest batch
    measured (None before the second)."""


class ProgressReporter:
    """The progress callback of `evaluate_request`, written to the store without slowing the work.

    Writes are throttled to one per `min_interval_s`; a thread writes at least every
    `heartbeat_s`, so a long batch (or a slow model load) never looks like a dead worker.
    Totals add up lm-eval's request types as it reaches them (it runs them one after another).
    It also keeps when the computed requests last moved and the longest gap between two moves,
    which the scheduler reads to tell a stalled job from a slow one (`scheduler.StallBounds`):
    the heartbeat thread goes on writing while the main thread hangs, but these stand still.
    Requests from the cache are not moves: they say nothing of the model or its batches. The
    slowest gap is that of the current kind of request (a generation batch may take a hundred
    times a log-likelihood one), so it is unmeasured again when lm-eval moves to the next kind.
    """

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        *,
        min_interval_s: float = 0.5,
        heartbeat_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.job_id = store, job_id
        self.min_interval_s, self.heartbeat_s, self.clock = min_interval_s, heartbeat_s, clock
        self._phases: dict[str, tuple[int, int, int]] = {}  # phase -> (done from the cache, done, total)
        self._tokens = 0
        self._started: float | None = None
        self._computed = 0
        self._moved: float | None = None  # on `clock`, for the gaps
        self._moved_at: float | None = None  # wall time, for the scheduler
        self._slowest: float | None = None
        self._written = -math.inf
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, phase: str, done: int, total: int, tokens: int) -> None:
        now = self.clock()
        with self._lock:
            if self._started is None:
                self._started = now
            if phase not in self._phases:  # another kind of request: its batches may take far longer
                self._moved = self._slowest = None
            cached = self._phases[phase][0] if phase in self._phases else done
            self._phases[phase] = (cached, done, total)
            self._tokens = tokens
            computed = sum(d - c for c, d, _ in self._phases.values())
            if computed > self._computed:
                if self._moved is not None:
                    self._slowest = max(self._slowest or 0.0, now - self._moved)
                self._computed, self._moved, self._moved_at = computed, now, time.time()
            due = now - self._written >= self.min_interval_s or done == total
        if due:
            self.flush()

    def snapshot(self) -> ProgressSnapshot | None:
        """Requests done of those known so far, and the rates of this attempt's own computing."""
        with self._lock:
            if self._started is None:
                return None
            elapsed = self.clock() - self._started
            done = sum(d for _, d, _ in self._phases.values())
            total = sum(t for _, _, t in self._phases.values())
            computed = sum(d - cached for cached, d, _ in self._phases.values())
            tokens = self._tokens
            moved = {"progress_at": self._moved_at, "slowest_batch_s": self._slowest}
        if elapsed <= 0 or computed <= 0:
            return ProgressSnapshot(done, total, None, None, **moved)
        return ProgressSnapshot(done, total, round(tokens / elapsed, 3), round(computed / elapsed, 3), **moved)

    def flush(self) -> None:
        """Write progress (or a heartbeat); a store that fails is only logged: the next write catches up."""
        snapshot = self.snapshot()
        with self._lock:
            self._written = self.clock()
        try:
            if snapshot is None:
                self.store.heartbeat(self.job_id)
            else:
                self.store.update_progress(self.job_id, done=snapshot.done, total=snapshot.total,
                                           tokens_per_s=snapshot.tokens_per_s,
                                           requests_per_s=snapshot.requests_per_s,
                                           progress_at=snapshot.progress_at,
                                           slowest_batch_s=snapshot.slowest_batch_s)
        except sqlite3.Error as error:
            print(f"[evalfleet worker] progress not written: {error}", file=sys.stderr, flush=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.flush()
            except Exception as error:  # the heartbeat thread must outlive anything; the next beat retries
                print(f"[evalfleet worker] heartbeat failed: {error}", file=sys.stderr, flush=True)

    def __enter__(self) -> ProgressReporter:
        self._thread = threading.Thread(target=self._beat, name="evalfleet-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()


def confirm_start(store: JobStore, job_id: str) -> JobRecord:
    """placed -> running, as this process; a job launched by a plain executor is running already.

    A job is run by one process: the one its scheduler attached, or, where none is attached yet
    (a scheduler killed between starting this worker and recording it), the first to confirm,
    which records its own pid and start time so that the next scheduler adopts it. A worker that
    finds another process attached stops: it was launched by a scheduler whose successor has
    launched the job again."""
    record, me = store.get(job_id), os.getpid()
    if record.pid is not None and record.pid != me and record.state in (JobState.PLACED, JobState.RUNNING):
        raise UsageError(f"job {job_id} is held by process {record.pid}; this worker ({me}) leaves it to that one")
    if record.state is JobState.PLACED:
        now = time.time()
        mine = record.handle if record.pid == me else {"pid": me, "create_time": psutil.Process(me).create_time()}
        return store.transition(job_id, JobState.RUNNING, expect=JobState.PLACED, now=now, started_at=now,
                                heartbeat_at=now, pid=me, handle=mine, reason=f"worker {me} started")
    if record.state is not JobState.RUNNING:
        raise UsageError(f"job {job_id} is {record.state.value}; only placed jobs are run by a worker")
    return record


def limit_threads() -> None:
    """Stay within this job's share of the cores, as the executor set it."""
    threads = os.environ.get(THREADS_VARIABLE)
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))


def describe_error(error: Exception) -> str:
    """One line for the store: a user-facing error as it is, anything else with its type."""
    text = str(error).strip()
    if not isinstance(error, EvalfleetError):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text.splitlines()[0]


def _evaluate(request: EvaluationRequest, store: JobStore, record: JobRecord, reporter: ProgressReporter) -> EvaluationResult:
    """Here, or with the ranks on a Ray cluster when the Ray executor launched this worker.

    Here, a job that can change width follows the scheduler's replica orders while it runs.
    """
    job_id = record.id
    from evalfleet.orchestrator.executors.ray import ADDRESS_VARIABLE, NODES_VARIABLE

    address = os.environ.get(ADDRESS_VARIABLE)
    if address:
        from evalfleet.engines.ray_engine import evaluate_on_ray
        from evalfleet.orchestrator.pool_status import record_ranks

        return evaluate_on_ray(request, address, json.loads(os.environ[NODES_VARIABLE]), progress=reporter,
                               on_ranks=lambda ranks: record_ranks(store, job_id, ranks))
    from evalfleet.engines.run import evaluate_request

    if not resizable(record):
        return evaluate_request(request, progress=reporter)
    # Worker groups even for one replica, so that replicas can join it.
    layout = _given_layout(record)
    request = request.model_copy(update={"engine": "distributed", "strategy": "auto", **layout})
    live = LiveReplicas(store.path, job_id, record.placement or (), layout["tp"] * layout["pp"])
    try:
        return evaluate_request(request, progress=reporter, on_runner=live.attach)
    finally:
        live.close()


def progress_store(db_path: str | os.PathLike[str], busy_timeout_s: float = 30.0) -> JobStore:
    """The store a worker's progress and heartbeats are written through: one that waits for a busy
    store `PROGRESS_BUSY_TIMEOUT_S` at most, then skips the write (the next catches up), so that the
    computing, which reports its progress after each batch, never waits out another writer's lock."""
    return JobStore(db_path, busy_timeout_s=min(busy_timeout_s, PROGRESS_BUSY_TIMEOUT_S))


def run_worker(job_id: str, db_path: str | os.PathLike[str], *, heartbeat_s: float = 5.0,
               busy_timeout_s: float = 30.0) -> EvaluationResult:
    """Run a placed job to its result; heartbeats start before the (slow) imports and model load."""
    with JobStore(db_path, busy_timeout_s=busy_timeout_s) as store:
        try:
            record = confirm_start(store, job_id)
        except sqlite3.Error as error:
            raise StorageFault(f"cannot start job {job_id}: the job store failed: {error}") from error
        with progress_store(store.path, busy_timeout_s) as writes, \
                ProgressReporter(writes, job_id, heartbeat_s=heartbeat_s) as reporter:
            on_gpus = os.environ.get("CUDA_VISIBLE_DEVICES") != ""  # a CPU slot's job sees no GPU
            watch = DeviceWatch(record.placement or () if on_gpus else ())
            try:
                request = job_request(record, store.path)
                limit_threads()
                result = _evaluate(request, store, record, reporter)
            except Exception as error:
                message = describe_error(error)
                report = exit_report(error, message, watch.evidence())
                try:  # waited out as the result's commit is: the account is what the scheduler acts on
                    _write_with_retries("exit report", lambda: store.report_error(
                        job_id, message, report.model_dump(mode="json")))
                except sqlite3.Error as unwritten:  # the exit code still says what happened
                    print(f"[evalfleet worker] exit report not written: {unwritten}", file=sys.stderr, flush=True)
                if isinstance(error, EvalfleetError):
                    raise
                traceback.print_exc()
                raise (StorageFault if storage_fault(error) else EvalfleetError)(message) from error
            finally:
                watch.close()
        record_result(store, job_id, result)
    return result


def record_result(store: JobStore, job_id: str, result: EvaluationResult) -> None:
    """running -> succeeded. A busy or failing store is waited out a few times; then the job is left
    to the scheduler's retry (exit code of `StorageFault`), which finds every request in the cache."""
    cache = result.evalfleet.get("cache", {})
    try:
        _write_with_retries("result", lambda: store.transition(
            job_id, JobState.SUCCEEDED, expect=JobState.RUNNING, result_path=result.output_path,
            reason=f"finished; {cache.get('hits', 0)} requests from the cache, {cache.get('computed', 0)} computed"))
    except sqlite3.Error as error:
        raise StorageFault(f"cannot record the result of job {job_id} in the job store: {error}") from error


def _write_with_retries(what: str, write: Callable[[], object]) -> None:
    """`write` to the store, waiting out a busy or failing store `COMMIT_ATTEMPTS` times (each after
    the store's busy timeout, then `COMMIT_BACKOFF_S`, doubling); the last error is raised."""
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            write()
            return
        except sqlite3.Error as error:
            if attempt + 1 == COMMIT_ATTEMPTS:
                raise
            delay = COMMIT_BACKOFF_S * 2 ** attempt
            print(f"[evalfleet worker] {what} not recorded ({error}); again in {delay:.0f}s", file=sys.stderr,
                  flush=True)
            time.sleep(delay)
