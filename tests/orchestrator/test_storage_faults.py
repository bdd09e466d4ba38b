"""The job store under a real held lock: opens that take no write lock, progress that never fails a job,
a result that waits the lock out, and storage failures that are retried without blaming a device.

The lock is another connection's `BEGIN EXCLUSIVE`, held past the store's (shortened) busy timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import sqlite3
import sys
import threading
from collections.abc import Iterator

import pytest

from evalfleet.orchestrator import JobState, JobStore, RecoveryOptions, SubprocessExecutor, slot_inventory
from evalfleet.orchestrator import worker as worker_module
from evalfleet.orchestrator.failures import FailureClass, StorageFault, classify, exit_report
from evalfleet.orchestrator.scheduler import DistributedEvaluationOrchestrator
from evalfleet.orchestrator.worker import ProgressReporter, progress_store, run_worker
from evalfleet.types import EvaluationResult

REQUEST = {"model": {"path": "demo"}, "tasks": {"names": ["demo_mc"], "limit": 2}}
DEMAND = {"model": "demo", "work_tokens": 100.0, "tokens_per_s": [10.0]}
BUSY_S = 0.1


class HeldLock:
    """Another connection holding the store's write lock until `release`."""

    def __init__(self, db) -> None:
        self.conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        self.conn.execute("BEGIN EXCLUSIVE")
        self.released, self._released = False, threading.Lock()

    def release(self) -> None:
        with self._released:
            if not self.released:
                self.conn.execute("ROLLBACK")
                self.conn.close()
                self.released = True


@contextlib.contextmanager
def held_lock(db) -> Iterator[HeldLock]:
    lock = HeldLock(db)
    try:
        yield lock
    finally:
        lock.release()


def _running(store: JobStore, placement=((0, 0),)) -> str:
    job = store.add(REQUEST, priority="normal", max_attempts=3, demand=DEMAND)
    store.transition(job, JobState.PLACED, placement=list(placement))
    store.transition(job, JobState.RUNNING)
    return job


def test_opening_a_current_store_takes_no_write_lock(tmp_path):
    db = tmp_path / "jobs.db"
    with JobStore(db) as store:
        job = store.add(REQUEST, priority="normal", max_attempts=3)
    with held_lock(db) as lock:
        with JobStore(db, busy_timeout_s=BUSY_S) as store:  # waited BUSY_S and failed, before
            assert store.get(job).state is JobState.QUEUED
            with pytest.raises(sqlite3.OperationalError, match="database is locked"):
                store.heartbeat(job)
            lock.release()
            store.heartbeat(job)  # the failed write left no transaction open behind it
            assert store.get(job).heartbeat_at is not None


def test_a_store_locked_past_its_busy_timeout_is_an_infrastructure_failure_that_blames_no_device(tmp_path):
    db = tmp_path / "jobs.db"
    JobStore(db).close()
    with held_lock(db), JobStore(db, busy_timeout_s=BUSY_S) as waiting:
        with pytest.raises(sqlite3.OperationalError) as locked:
            waiting.heartbeat("any")
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    for error in (locked.value, disk_full):
        assert classify(error) is FailureClass.INFRASTRUCTURE
        report = exit_report(error, str(error), [])
        assert report.failure is FailureClass.INFRASTRUCTURE and not report.blame_devices
    assert classify(ValueError("a bug")) is FailureClass.DETERMINISTIC and exit_report(ValueError(), "", []).blame_devices


def test_progress_and_heartbeats_into_a_locked_store_never_fail_the_job(tmp_path, capsys):
    db = tmp_path / "jobs.db"
    with JobStore(db, busy_timeout_s=BUSY_S) as store:
        job = _running(store)
        with ProgressReporter(store, job, min_interval_s=0, heartbeat_s=3600) as report:
            with held_lock(db):
                report("loglikelihood", 1, 10, 100)  # raised OperationalError into the job's compute, before
                report.flush()
            report("loglikelihood", 2, 10, 200)  # the next write catches up
            assert (store.get(job).done, store.get(job).total) == (2, 10)
    assert "progress not written: database is locked" in capsys.readouterr().err


def _result(tmp_path) -> EvaluationResult:
    return EvaluationResult(results={"results": {}}, evalfleet={"cache": {"hits": 3, "computed": 0}},
                            output_path=str(tmp_path / "results.json"))


def test_a_result_commit_waits_out_a_held_lock(tmp_path, monkeypatch):
    db = tmp_path / "jobs.db"
    with JobStore(db) as store:
        job = _running(store)
        store.transition(job, JobState.QUEUED)
        store.transition(job, JobState.PLACED, placement=[(0, 0)])
    monkeypatch.setattr(worker_module, "COMMIT_BACKOFF_S", 0.2)
    locks: list[HeldLock] = []

    def evaluate_then_lock(request, store, record, reporter):
        locks.append(HeldLock(db))  # the store is locked when the job has its result
        threading.Timer(0.3, locks[0].release).start()  # and free again while the commit backs off
        return _result(tmp_path)

    monkeypatch.setattr(worker_module, "_evaluate", evaluate_then_lock)
    run_worker(job, db, heartbeat_s=3600, busy_timeout_s=BUSY_S)
    with JobStore(db) as store:
        record = store.get(job)
    assert record.state is JobState.SUCCEEDED and record.result_path == str(tmp_path / "results.json")


def test_a_store_locked_through_the_commit_leaves_the_job_to_a_retry_that_blames_no_device(tmp_path, monkeypatch):
    db = tmp_path / "jobs.db"
    with JobStore(db) as store:
        job = _running(store)
        store.transition(job, JobState.QUEUED)
        store.transition(job, JobState.PLACED, placement=[(0, 0)])
    monkeypatch.setattr(worker_module, "COMMIT_ATTEMPTS", 2)
    monkeypatch.setattr(worker_module, "COMMIT_BACKOFF_S", 0.01)
    locks: list[HeldLock] = []

    def evaluate_then_lock(request, store, record, reporter):
        locks.append(HeldLock(db))
        return _result(tmp_path)

    monkeypatch.setattr(worker_module, "_evaluate", evaluate_then_lock)
    try:
        with pytest.raises(StorageFault, match="cannot record the result") as caught:
            run_worker(job, db, heartbeat_s=3600, busy_timeout_s=BUSY_S)
    finally:
        locks[0].release()
    assert caught.value.exit_code == StorageFault.exit_code == 74
    with JobStore(db) as store:
        assert store.get(job).state is JobState.RUNNING  # nothing said it failed: nothing could be written



def test_a_worker_that_exits_for_storage_is_retried_later_and_blames_no_device(tmp_path):
    """Exit code 74 with no report (the store took none): infrastructure, retried at once and then with
    backoff, no device counted."""
    exit_74 = SubprocessExecutor([sys.executable, "-c", f"import sys; sys.exit({StorageFault.exit_code})"])
    exit_74.self_reporting = True  # as the local executor's workers: the scheduler settles only what they did not
    orchestrator = DistributedEvaluationOrchestrator(tmp_path / "jobs.db", slot_inventory(1, memory_gb=8), exit_74,
                                                     recovery=RecoveryOptions(backoff_base_s=60))
    job = orchestrator.store.add(REQUEST, priority="normal", max_attempts=3, demand=DEMAND)
    while orchestrator.store.get(job).attempts < 2:  # the first retry is at once; the next waits
        asyncio.run(orchestrator.run_once())
    record = orchestrator.store.get(job)
    assert record.state is JobState.QUEUED and record.not_before > record.enqueued_at + 59
    assert orchestrator.store.device_failures((0, 0), since=0) == []


def test_a_disk_that_fills_during_the_job_is_retried_without_blame(tmp_path, monkeypatch):
    db = tmp_path / "jobs.db"
    with JobStore(db) as store:
        job = _running(store)
        store.transition(job, JobState.QUEUED)
        store.transition(job, JobState.PLACED, placement=[(0, 0)])

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(worker_module, "_evaluate", disk_full)
    with pytest.raises(StorageFault):
        run_worker(job, db, heartbeat_s=3600)
    with JobStore(db) as store:
        failure = store.get(job).failure
    assert failure["failure"] == "infrastructure" and failure["blame_devices"] is False


def test_progress_reported_after_a_batch_does_not_wait_out_a_held_lock(tmp_path):
    """The computing reports progress after each batch: under another writer's lock the report is
    skipped after a short wait, not after the store's whole busy timeout (30 s here), so batches go
    on while the lock is held. The lock's holder lets go after 20 s at most, or when the report returns."""
    db = tmp_path / "jobs.db"
    with JobStore(db, busy_timeout_s=30.0) as store:
        job = _running(store)
    returned, released_first = threading.Event(), []
    with held_lock(db) as lock:
        def holder() -> None:
            released_first.append(not returned.wait(20.0))
            lock.release()

        thread = threading.Thread(target=holder)
        thread.start()
        with progress_store(db, busy_timeout_s=30.0) as writes:
            report = ProgressReporter(writes, job, min_interval_s=0, heartbeat_s=3600)
            report("loglikelihood", 1, 10, 100)
            returned.set()
            thread.join()
    assert released_first == [False], "the report waited for the lock to be released"
    with JobStore(db) as store:
        assert store.get(job).done == 0  # skipped, not written late
