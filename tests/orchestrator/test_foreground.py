"""The foreground scheduler loop, in this process: its lock, its log lines, and a clean stop."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import sys
import threading
import time

import psutil
import pytest

from evalfleet.orchestrator import JobState, JobStore, SubprocessExecutor, slot_inventory
from evalfleet.orchestrator.foreground import SchedulerOptions, describe_event, run_scheduler, scheduler_lock
from evalfleet.orchestrator.pool import recorded_pool
from evalfleet.orchestrator.store import Event
from evalfleet.types import EvalfleetError

REQUEST = {"model": {"path": "demo"}, "tasks": {"names": ["demo_mc"], "limit": 2}}
DEMAND = {"model": "demo", "work_tokens": 100.0, "tokens_per_s": [10.0]}


def test_one_scheduler_per_store(tmp_path):
    db = tmp_path / "jobs.db"
    with scheduler_lock(db):
        with pytest.raises(EvalfleetError, match=f"already running on {db} \\(pid {os.getpid()}\\)"):
            with scheduler_lock(db):
                pass
    with scheduler_lock(db):  # released on exit
        pass


def test_events_read_as_one_line():
    moved = Event("abc", time.mktime((2024, 1, 2, 3, 4, 5, 0, 0, -1)), JobState.RUNNING, JobState.QUEUED, 1, "why")
    assert describe_event(moved) == "03:04:05 job abc running -> queued: why"
    assert describe_event(Event("abc", moved.at, None, JobState.QUEUED, 0, None)) == "03:04:05 job abc queued"


def test_sigterm_stops_launching_stops_workers_and_requeues(tmp_path):
    db = tmp_path / "jobs.db"
    with JobStore(db) as store:
        job = store.add(REQUEST, priority="normal", max_attempts=3, demand=DEMAND)
        orphan = store.add(REQUEST, priority="low", max_attempts=3, demand=DEMAND)
        store.transition(orphan, JobState.PLACED, placement=[(0, 1)], owner=f"{socket.gethostname()}:1")
        store.transition(orphan, JobState.RUNNING, handle={"pid": 2 ** 22 + 17, "create_time": 1.0})
    lines: list[str] = []
    workers: list[int] = []

    def stop_once_launched() -> None:
        with JobStore(db) as watcher:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                record = watcher.get(job)
                if record.pid is not None:
                    workers.append(record.pid)
                    break
                time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=stop_once_launched, daemon=True).start()
    run_scheduler(db, slot_inventory(1, memory_gb=8), SchedulerOptions(interval_s=0.05, grace_s=5), lines.append)

    assert signal.getsignal(signal.SIGTERM) == before
    assert lines[0].startswith(f"evalfleet scheduler (pid {os.getpid()}) on 1 CPU slot")
    assert f"requeued 1 job(s) whose process was gone: {orphan}" in lines
    assert lines[-1] == "scheduler stopped; 1 job(s) requeued"
    assert any(f"job {job} queued -> placed" in line for line in lines)
    assert workers and not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                               for pid in workers)
    with JobStore(db) as store:
        record = store.get(job)
        assert record.state is JobState.QUEUED and record.attempts == 0 and record.pid is None
        assert store.get(orphan).attempts == 1
        assert recorded_pool(store)["description"] == "1 CPU slot" and recorded_pool(store)["max_attempts"] == 3


def _scheduler_until(db, executor, *, on_line) -> list[str]:
    """`run_scheduler` in this process; `on_line` sees each console line as it is said (and may act on it)."""
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        on_line(line, lines)

    watchdog = threading.Timer(60, os.kill, (os.getpid(), signal.SIGTERM))  # a scenario that stalls ends red
    watchdog.start()
    try:
        run_scheduler(db, slot_inventory(1, memory_gb=8),
                      SchedulerOptions(interval_s=0.05, grace_s=5, backoff_s=0, busy_timeout_s=0.1),
                      say, executor=executor)
    finally:
        watchdog.cancel()
    return lines


def _stop_when_succeeded(job: str):
    def check(line: str) -> None:
        if f"job {job} running -> succeeded" in line:
            os.kill(os.getpid(), signal.SIGTERM)
    return check


def test_a_round_that_meets_a_store_locked_past_its_busy_timeout_is_retried_and_the_scheduler_goes_on(tmp_path):
    db = tmp_path / "jobs.db"
    with JobStore(db) as store:
        job = store.add(REQUEST, priority="normal", max_attempts=3, demand=DEMAND)
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    succeeded = _stop_when_succeeded(job)

    def on_line(line: str, lines: list[str]) -> None:
        if "Ctrl-C stops it" in line:  # said before the first round: that round meets the lock
            holder.execute("BEGIN EXCLUSIVE")
        if sum("round failed" in said for said in lines) == 3 and holder.in_transaction:
            holder.execute("ROLLBACK")
        succeeded(line)

    executor = SubprocessExecutor([sys.executable, "-c", "pass"], log_dir=tmp_path / "logs")
    lines = _scheduler_until(db, executor, on_line=on_line)
    holder.close()

    failed = [line for line in lines if "round failed" in line]
    assert len(failed) == 3 and all("OperationalError: database is locked" in line for line in failed)
    delays = [float(line.rsplit(" ", 1)[1].rstrip("s")) for line in failed]
    assert delays == [0.1, 0.2, 0.4]  # doubling from the interval
    log = (tmp_path / "logs" / "scheduler.log").read_text()
    assert log.count("Traceback") == 3 and "sqlite3.OperationalError: database is locked" in log
    assert lines[-1] == "scheduler stopped; 0 job(s) requeued"
    with JobStore(db) as store:
        assert store.get(job).state is JobState.SUCCEEDED and store.get(job).attempts == 0


def test_a_launch_whose_log_folder_cannot_be_made_is_retried_and_the_scheduler_goes_on(tmp_path):
    db = tmp_path / "jobs.db"
    with JobStore(db) as store:
        job = store.add(REQUEST, priority="normal", max_attempts=3, demand=DEMAND)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the log folder's parent should be")
    succeeded = _stop_when_succeeded(job)

    def on_line(line: str, lines: list[str]) -> None:
        if "launch failed" in line:
            blocker.unlink()
        succeeded(line)

    executor = SubprocessExecutor([sys.executable, "-c", "pass"], log_dir=blocker / "logs")
    lines = _scheduler_until(db, executor, on_line=on_line)

    assert any(f"job {job} placed -> queued" in line and "launch failed: NotADirectoryError" in line for line in lines)
    with JobStore(db) as store:
        record = store.get(job)
        assert record.state is JobState.SUCCEEDED and record.attempts == 1
        assert store.device_failures((0, 0), since=0) == []  # the folder says nothing about the slot


def test_a_pool_that_cannot_be_read_fails_rounds_not_the_scheduler(tmp_path):
    """As a Ray cluster whose `ray.nodes()` fails for a while."""
    db = tmp_path / "jobs.db"
    with JobStore(db) as store:
        job = store.add(REQUEST, priority="normal", max_attempts=3, demand=DEMAND)

    class UnreachablePool(SubprocessExecutor):
        failures = 2

        def current_pool(self):
            if self.failures:
                self.failures -= 1
                raise ConnectionRefusedError(111, "Connection refused")
            return None

    executor = UnreachablePool([sys.executable, "-c", "pass"], log_dir=tmp_path / "logs")
    lines = _scheduler_until(db, executor, on_line=lambda line, lines: _stop_when_succeeded(job)(line))
    assert sum("round failed (ConnectionRefusedError: [Errno 111] Connection refused)" in line for line in lines) == 2
    with JobStore(db) as store:
        assert store.get(job).state is JobState.SUCCEEDED
