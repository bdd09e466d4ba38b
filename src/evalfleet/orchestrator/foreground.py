"""`evalfleet scheduler`: the orchestrator loop in the foreground, one per job store.

It prints each job event as it happens. A round that fails is retried with backoff (see
`rounds.py`), its traceback in `<store folder>/logs/scheduler.log`. Only Ctrl-C or SIGTERM
stops it: it stops launching, stops its workers (SIGTERM, then SIGKILL after the grace
period) and requeues their jobs without counting an attempt, so the next scheduler resumes
them from the request cache and no worker outlives it. A lock file next to the store keeps
a second scheduler out.

`evalfleet run --ray` is the other foreground loop (`run_on_ray`): one evaluation whose
attempts are retried by the scheduler's rule (`run_with_retries`), each resuming from the
request cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from evalfleet.orchestrator.executors.base import Executor
from evalfleet.orchestrator.executors.local import LocalExecutor
from evalfleet.orchestrator.failures import classify
from evalfleet.orchestrator.policy import PolicyOptions
from evalfleet.orchestrator.pool import record_pool
from evalfleet.orchestrator.recovery import RecoveryOptions, next_streak, retry_delay
from evalfleet.orchestrator.rounds import log as round_log
from evalfleet.orchestrator.rounds import run_rounds
from evalfleet.orchestrator.scheduler import (
    SELF_REPORTING_HEARTBEAT_TIMEOUT_S,
    DistributedEvaluationOrchestrator,
    StallBounds,
)
from evalfleet.orchestrator.demand import describe_pool
from evalfleet.orchestrator.store import Event, JobStore
from evalfleet.planning import Inventory
from evalfleet.types import EvalfleetError, NodeLost

if TYPE_CHECKING:
    from evalfleet.runtime.lm import ProgressCallback
    from evalfleet.types import EvaluationRequest, EvaluationResult

Result = TypeVar("Result")
NODE_DEATH_WAIT_S = 60.0
"""After a lost node, the next `run --ray` attempt waits at most this long for Ray to count one of
the last attempt's nodes dead (its health checks take seconds to tens of seconds): as long as the
ranks' bound on reserving GPUs (`ray_ranks.PLACEMENT_TIMEOUT_S`), which the attempt would
otherwise wait out on a node Ray still lists."""


@dataclass(frozen=True)
class SchedulerOptions:
    preempt: bool = False
    resize: bool = True
    """Grow and shrink running jobs whose workers can (`policy`: live elastic width)."""
    max_attempts: int = 3
    backoff_s: float = 30.0
    """Delay before the first retry; it doubles with each failed attempt."""
    interval_s: float = 2.0
    heartbeat_timeout_s: float = SELF_REPORTING_HEARTBEAT_TIMEOUT_S
    stall: StallBounds = StallBounds()
    """When a job that heartbeats but computes nothing is stopped and retried (see `scheduler`)."""
    grace_s: float = 10.0
    busy_timeout_s: float = 30.0
    """How long a store write waits for another process's lock; past it the round fails and is retried."""
    standby: bool = True
    """Keep one worker process warm, its imports done, for the next launch (`executors.standby`)."""


@contextlib.contextmanager
def scheduler_lock(db_path: Path) -> Iterator[None]:
    """One scheduler per store: two would both think the same devices are free."""
    lock_path = db_path.with_name(db_path.name + ".scheduler.lock")
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise EvalfleetError(f"a scheduler is already running on {db_path} (pid {holder})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _round_log(path: Path) -> Iterator[None]:
    """Failed rounds' tracebacks to a file beside the workers' logs (the console gets one line each);
    a folder that cannot be made leaves them on standard error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path, delay=True)
    except OSError:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    round_log.addHandler(handler)
    round_log.propagate = False
    try:
        yield
    finally:
        round_log.removeHandler(handler)
        round_log.propagate = True
        handler.close()


def describe_event(event: Event) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event.at))
    change = f"{event.from_state.value} -> {event.to_state.value}" if event.from_state else event.to_state.value
    return f"{stamp} job {event.job_id} {change}" + (f": {event.reason}" if event.reason else "")


def _say(line: str) -> None:
    print(line, flush=True)


def run_scheduler(
    db_path: str | os.PathLike[str],
    inventory: Inventory,
    options: SchedulerOptions = SchedulerOptions(),
    say: Callable[[str], None] = _say,
    executor: Executor | None = None,
) -> None:
    """Schedule over `inventory` with `executor` (default: worker processes on this machine)."""
    with JobStore(db_path, busy_timeout_s=options.busy_timeout_s) as store, scheduler_lock(store.path), \
            _round_log(store.path.parent / "logs" / "scheduler.log"):
        executor = executor or LocalExecutor(store.path, inventory, grace_s=options.grace_s, standby=options.standby)
        orchestrator = DistributedEvaluationOrchestrator(
            store, inventory, executor,
            policy=PolicyOptions(preemption=options.preempt, resize=options.resize),
            recovery=RecoveryOptions(max_attempts=options.max_attempts, backoff_base_s=options.backoff_s),
            heartbeat_timeout_s=options.heartbeat_timeout_s, stall=options.stall,
        )
        record_pool(store, inventory, max_attempts=options.max_attempts)
        say(f"evalfleet scheduler (pid {os.getpid()}) on {describe_pool(inventory)} ({executor.name}), "
                      f"store {store.path}; Ctrl-C stops it")
        try:
            asyncio.run(_serve(orchestrator, options, say))
        finally:
            executor.close()


async def _serve(orchestrator: DistributedEvaluationOrchestrator, options: SchedulerOptions,
                 say: Callable[[str], None]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        loop.add_signal_handler(sig, stop.set)
    store = orchestrator.store
    seen = max((event.id for event in store.events()), default=0)

    def report() -> None:
        nonlocal seen
        for event in store.events(after=seen):
            say(describe_event(event))
            seen = event.id

    try:
        await run_rounds(orchestrator, options.interval_s, stop, say, after_round=report)
        say("stopping: no new launches; stopping workers")
    finally:
        requeued = orchestrator.shutdown(wait_s=options.grace_s + 5.0)
        with contextlib.suppress(sqlite3.Error):  # a failing store leaves the last events unprinted, no more
            report()
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)
    say(f"scheduler stopped; {len(requeued)} job(s) requeued")


def run_with_retries(attempt: Callable[[], Result], options: RecoveryOptions = RecoveryOptions(),
                     say: Callable[[str], None] = _say, sleep: Callable[[float], None] = time.sleep,
                     progressed: Callable[[], bool] = lambda: False) -> Result:
    """`attempt()` until it succeeds, retried as the scheduler retries a job (`recovery.retry_delay`):
    an infrastructure failure again, at once the first time in a row and after a lost node, with
    backoff for failures in a row in which `progressed()` says the attempt computed nothing; one
    line each, up to `options.max_attempts` in all; then the last failure is raised. Each attempt
    resumes from the request cache, where the failed ones left every finished request."""
    failures = streak = 0
    while True:
        try:
            return attempt()
        except Exception as error:
            failures += 1
            streak = next_streak(streak, progressed())
            delay = retry_delay(failures, classify(error), options, streak=streak,
                                backoff=not isinstance(error, NodeLost))
            if delay is None:
                raise
            say(f"attempt {failures} of {options.max_attempts} failed ({str(error).strip().splitlines()[0]}); "
                f"retrying in {delay:.0f}s from the request cache")
            sleep(delay)


def run_on_ray(request: EvaluationRequest, address: str, *, progress: ProgressCallback | None = None,
               options: RecoveryOptions = RecoveryOptions(), say: Callable[[str], None] = _say) -> EvaluationResult:
    """`evalfleet run --ray`: `evaluate_on_ray` with the scheduler's retries (`run_with_retries`).

    An attempt after a lost node first waits (`NODE_DEATH_WAIT_S` at most) until Ray counts a node
    of the last attempt's ranks dead, so that its groups spread over the nodes that remain.
    """
    from evalfleet.engines.ray_engine import cluster_gpus, evaluate_on_ray

    used: set[str] = set()
    lost = computed = False

    def record(ranks: list[list[dict]]) -> None:
        used.update(rank["node_id"] for replica in ranks for rank in replica)

    def tracked(phase: str, done: int, total: int, tokens: int) -> None:
        nonlocal computed
        computed = computed or tokens > 0  # tokens computed by this attempt, not read from the cache
        if progress is not None:
            progress(phase, done, total, tokens)

    def attempt() -> EvaluationResult:
        nonlocal lost, computed
        computed = False
        if lost and used:
            deadline = time.monotonic() + NODE_DEATH_WAIT_S
            while used <= set(cluster_gpus()) and time.monotonic() < deadline:
                time.sleep(0.5)
        used.clear()
        try:
            return evaluate_on_ray(request, address, progress=tracked, on_ranks=record)
        except NodeLost:
            lost = True
            raise

    return run_with_retries(attempt, options, say, progressed=lambda: computed)
