"""The foreground scheduler loop, in this process: its lock, its log lines, and a clean stop."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import psutil
import pytest

from evalfleet.orchestrator import JobState, JobStore, slot_inventory
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
