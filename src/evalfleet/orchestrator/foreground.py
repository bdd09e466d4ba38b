"""`evalfleet scheduler`: the orchestrator loop in the foreground, one per job store.

It prints each job event as it happens. A round that fails is retried with backoff (see
`rounds.py`), its traceback in `<store folder>/logs/scheduler.log`. Only Ctrl-C or SIGTERM
stops it: it stops launching, stops its workers (SIGTERM, then SIGKILL after the grace
period) and requeues their jobs without counting an attempt, so the next scheduler resumes
them from the request cache and no worker outlives it. A lock file next to the store keeps
a second scheduler out.
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

from evalfleet.orchestrator.executors.base import Executor
from evalfleet.orchestrator.executors.local import LocalExecutor
from evalfleet.orchestrator.policy import PolicyOptions
from evalfleet.orchestrator.pool import record_pool
from evalfleet.orchestrator.recovery import RecoveryOptions
from evalfleet.orchestrator.rounds import log as round_log
from evalfleet.orchestrator.rounds import run_rounds
from evalfleet.orchestrator.scheduler import SELF_REPORTING_HEARTBEAT_TIMEOUT_S, DistributedEvaluationOrchestrator
from evalfleet.orchestrator.sizing import describe_pool
from evalfleet.orchestrator.store import Event, JobStore
from evalfleet.planning import Inventory
from evalfleet.types import EvalfleetError


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
    grace_s: float = 10.0
    busy_timeout_s: float = 30.0
    """How long a store write waits for another process's lock; past it the round fails and is retried."""


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
        executor = executor or LocalExecutor(store.path, inventory, grace_s=options.grace_s)
        orchestrator = DistributedEvaluationOrchestrator(
            store, inventory, executor,
            policy=PolicyOptions(preemption=options.preempt, resize=options.resize),
            recovery=RecoveryOptions(max_attempts=options.max_attempts, backoff_base_s=options.backoff_s),
            heartbeat_timeout_s=options.heartbeat_timeout_s,
        )
        record_pool(store, inventory, max_attempts=options.max_attempts)
        say(f"evalfleet scheduler (pid {os.getpid()}) on {describe_pool(inventory)} ({executor.name}), "
                      f"store {store.path}; Ctrl-C stops it")
        asyncio.run(_serve(orchestrator, options, say))


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
