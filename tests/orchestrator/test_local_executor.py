"""LocalExecutor's pinning, and the scheduler with workers that report for themselves.

The stand-in workers are tiny Python scripts that talk to the real store the way
`evalfleet worker` does, so each path (success, silent exit, crash, wrong request,
shutdown) costs a fraction of a second instead of a model load.
"""

from __future__ import annotations

import asyncio
import sys
import time

import psutil
import pytest

from evalfleet.orchestrator import (
    DistributedEvaluationOrchestrator,
    JobState,
    JobStore,
    LocalExecutor,
    RecoveryOptions,
    SubprocessExecutor,
    slot_inventory,
)
from evalfleet.orchestrator.executors.local import worker_command
from evalfleet.orchestrator.store import JobRecord
from evalfleet.planning import Inventory
from evalfleet.types import UsageError


def _record(job_id: str = "abc123") -> JobRecord:
    fields = {name: None for name in JobRecord.__dataclass_fields__}
    return JobRecord(**{**fields, "id": job_id, "request": {}, "priority": "normal", "state": JobState.PLACED,
                        "attempts": 0, "max_attempts": 3, "done": 0, "submitted_at": 0.0, "enqueued_at": 0.0,
                        "not_before": 0.0})


def test_cpu_slots_hide_gpus_and_share_the_cores(tmp_path):
    executor = LocalExecutor(tmp_path / "jobs.db", slot_inventory(2, memory_gb=8), cores=7)
    env = executor.job_env(_record(), [(0, 1)])
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["EVALFLEET_THREADS"] == env["OMP_NUM_THREADS"] == "3"
    assert env["EVALFLEET_JOB_ID"] == "abc123" and env["EVALFLEET_PLACEMENT"] == "[[0, 1]]"
    assert executor.self_reporting and executor.name == "local"
    assert worker_command("abc123", tmp_path / "jobs.db")[1:] == [
        "-m", "evalfleet.cli", "worker", "--job", "abc123", "--db", str(tmp_path / "jobs.db")]
    assert LocalExecutor(tmp_path / "jobs.db", slot_inventory(4, memory_gb=8), cores=2).threads_for(1) == 1


def test_gpu_jobs_see_only_their_gpus(tmp_path):
    executor = LocalExecutor(tmp_path / "jobs.db", Inventory.from_spec("4xA10G-24GB"), cores=16)
    env = executor.job_env(_record(), [(0, 1), (0, 3)])
    assert env["CUDA_VISIBLE_DEVICES"] == "1,3" and env["EVALFLEET_THREADS"] == "8"


def test_the_local_executor_runs_on_one_machine(tmp_path):
    with pytest.raises(UsageError, match="this machine only, but the pool has 2 nodes"):
        LocalExecutor(tmp_path / "jobs.db", Inventory.from_spec("2x8xH100-80GB"))


STAND_INS = {
    # As `evalfleet worker` does: confirm, report, record the result.
    "report": "w.confirm_start(s, job); s.update_progress(job, done=4, total=4, requests_per_s=2.0);"
              "s.transition(job, JobState.SUCCEEDED, expect=JobState.RUNNING, result_path='out.json')",
    "silent": "pass",
    "crash": "w.confirm_start(s, job); s.report_error(job, 'CUDA error: an illegal memory access'); sys.exit(1)",
    "wrong": "w.confirm_start(s, job); s.report_error(job, \"unknown task 'x'\"); sys.exit(2)",
    "hang": "time.sleep(60)",
    # As a Ray job's driver does when a node dies (NodeLost); the evidence must not count.
    "lost": "w.confirm_start(s, job); s.report_error(job, 'replica 0 lost a rank', {'failure': 'infrastructure',"
            " 'reason': 'replica 0 lost a rank', 'evidence': [{'device': [0, g], 'findings': ['Xid 79 (1 event)']}"
            " for g in range(2)]}); sys.exit(75)",
}


class StandInExecutor(SubprocessExecutor):
    self_reporting = True


def _stand_in(job, placement):
    body = STAND_INS[job.request["tasks"]["names"][0]]
    script = ("import os, sys, time; from evalfleet.orchestrator import worker as w, JobStore, JobState;"
              f"job = {job.id!r}; s = JobStore(os.environ['EVALFLEET_DB']);\n{body}")
    return [sys.executable, "-c", script]


def _orchestrator(tmp_path, slots=2, **kwargs):
    return DistributedEvaluationOrchestrator(
        tmp_path / "jobs.db", slot_inventory(slots, memory_gb=32),
        StandInExecutor(_stand_in, log_dir=tmp_path / "logs", grace_s=2.0,
                        env={"EVALFLEET_DB": str(tmp_path / "jobs.db")}),
        recovery=RecoveryOptions(max_attempts=3, backoff_base_s=60.0), **kwargs,
    )


def _submit(orchestrator, behaviour):
    request = {"model": {"path": "gpt2"}, "tasks": {"names": [behaviour], "limit": 2}}
    return orchestrator.submit_evaluation_request(request)


def _run_until(orchestrator, done, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        asyncio.run(orchestrator.run_once())
        if done():
            return
        time.sleep(0.02)
    raise AssertionError("the condition was not reached in time")


def _settled(orchestrator, job_id):
    record = orchestrator.status(job_id)
    return record.state.terminal or (record.state is JobState.QUEUED and record.attempts > 0)


def test_a_self_reporting_worker_settles_its_own_job(tmp_path):
    orchestrator = _orchestrator(tmp_path)
    job = _submit(orchestrator, "report")
    asyncio.run(orchestrator.run_once())
    placed = orchestrator.status(job)
    assert placed.state is JobState.PLACED and placed.pid is not None and placed.handle["pid"] == placed.pid
    _run_until(orchestrator, lambda: _settled(orchestrator, job) and not orchestrator._draining)
    record = orchestrator.status(job)
    assert record.state is JobState.SUCCEEDED and record.result_path == "out.json" and record.attempts == 0
    assert [e.to_state for e in orchestrator.store.events(job)] == [
        JobState.QUEUED, JobState.PLACED, JobState.RUNNING, JobState.SUCCEEDED]


def test_exits_without_a_result_are_failed_attempts_with_the_workers_reason(tmp_path):
    orchestrator = _orchestrator(tmp_path)
    silent, crash = _submit(orchestrator, "silent"), _submit(orchestrator, "crash")
    _run_until(orchestrator, lambda: _settled(orchestrator, silent) and _settled(orchestrator, crash))
    silent_record, crash_record = orchestrator.status(silent), orchestrator.status(crash)
    assert silent_record.state is JobState.QUEUED and "without reporting a result" in silent_record.error
    # retried at once, then (failing again without computing anything) held back for the backoff
    assert crash_record.state is JobState.QUEUED and crash_record.attempts == 2
    assert crash_record.error == "exited with code 1: CUDA error: an illegal memory access"
    retries = [e.reason for e in orchestrator.store.events(crash) if e.to_state is JobState.QUEUED and e.from_state]
    assert [reason.rsplit("; ", 1)[1] for reason in retries] == ["retry in 0s", "retry in 60s"]


def test_a_wrong_request_fails_at_once_and_blames_no_device(tmp_path):
    orchestrator = _orchestrator(tmp_path)
    job = _submit(orchestrator, "wrong")
    _run_until(orchestrator, lambda: _settled(orchestrator, job))
    record = orchestrator.status(job)
    assert record.state is JobState.FAILED and record.attempts == 1
    assert "unknown task 'x'" in record.error
    assert orchestrator.store.events(job)[-1].reason.endswith("the request itself is wrong")
    with JobStore(tmp_path / "jobs.db") as store:
        failures = store._conn.execute("SELECT COUNT(*) FROM device_failures").fetchone()[0]
    assert failures == 0


def test_a_lost_node_is_retried_at_once_and_blames_no_device(tmp_path):
    orchestrator = _orchestrator(tmp_path)
    job = _submit(orchestrator, "lost")
    _run_until(orchestrator, lambda: orchestrator.status(job).state.terminal)
    record = orchestrator.status(job)
    assert record.state is JobState.FAILED and record.attempts == 3 and "lost a rank" in record.error
    retries = [e.reason for e in orchestrator.store.events(job) if e.to_state is JobState.QUEUED and e.from_state]
    assert len(retries) == 2 and all(reason.endswith("retry in 0s") for reason in retries), retries
    assert orchestrator.store.quarantined() == {}
    with JobStore(tmp_path / "jobs.db") as store:
        assert store._conn.execute("SELECT COUNT(*) FROM device_failures").fetchone()[0] == 0


def test_shutdown_stops_workers_and_requeues_without_counting_an_attempt(tmp_path):
    orchestrator = _orchestrator(tmp_path)
    jobs = [_submit(orchestrator, "hang") for _ in range(3)]
    asyncio.run(orchestrator.run_once())
    placed = [orchestrator.status(job) for job in jobs if orchestrator.status(job).state is JobState.PLACED]
    assert len(placed) == 2
    requeued = orchestrator.shutdown(wait_s=20)
    assert sorted(requeued) == sorted(record.id for record in placed)
    for job in jobs:
        record = orchestrator.status(job)
        assert record.state is JobState.QUEUED and record.attempts == 0 and record.pid is None
    assert "scheduler stopped" in orchestrator.store.events(placed[0].id)[-1].reason
    assert not any(psutil.pid_exists(r.pid) and psutil.Process(r.pid).status() != psutil.STATUS_ZOMBIE
                   for r in placed)


def test_a_worker_that_never_reports_is_restarted_after_the_heartbeat_timeout(tmp_path):
    assert _orchestrator(tmp_path).heartbeat_timeout_s == 120.0  # on by default for self-reporting workers
    orchestrator = _orchestrator(tmp_path, slots=1, heartbeat_timeout_s=0.3)
    job = _submit(orchestrator, "hang")
    asyncio.run(orchestrator.run_once())
    pid = orchestrator.status(job).pid
    _run_until(orchestrator, lambda: _settled(orchestrator, job))
    record = orchestrator.status(job)
    assert record.state is JobState.QUEUED and record.error.startswith("no heartbeat for")
    _run_until(orchestrator, lambda: not orchestrator._draining)  # retried only after 60 s of backoff
    assert not psutil.pid_exists(pid)
