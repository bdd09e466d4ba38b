"""DistributedEvaluationOrchestrator with real child processes on a CPU slot pool."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import psutil
import pytest

from evalfleet.orchestrator import (
    DistributedEvaluationOrchestrator,
    JobState,
    JobStore,
    PolicyOptions,
    RecoveryOptions,
    SubprocessExecutor,
    slot_inventory,
)
from evalfleet.orchestrator.scheduler import StallBounds
from evalfleet.planning import Inventory
from evalfleet.types import EvalfleetError, UsageError

SCRIPTS = {
    "ok": "pass",
    "fail": "import sys; sys.exit(3)",
    "sleep": "import time; time.sleep(60)",
}


def _command(job, placement):
    """The job's first task name says how its stand-in process behaves."""
    return [sys.executable, "-c", SCRIPTS[job.request["tasks"]["names"][0]]]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _request(behaviour: str, priority: str = "normal", model: str = "gpt2") -> dict:
    return {"model": {"path": model}, "tasks": {"names": [behaviour], "limit": 5}, "priority": priority}


def _orchestrator(tmp_path, slots=2, clock=None, **kwargs):
    return DistributedEvaluationOrchestrator(
        tmp_path / "jobs.db", slot_inventory(slots, memory_gb=64),
        SubprocessExecutor(_command, log_dir=tmp_path / "logs", grace_s=2.0),
        clock=clock or time.time, **kwargs,
    )


def _run_until(orchestrator, done, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        asyncio.run(orchestrator.run_once())
        if done():
            return
        time.sleep(0.02)
    raise AssertionError("the condition was not reached in time")


def _state(orchestrator, job_id):
    return orchestrator.status(job_id).state


def test_submit_refuses_a_job_that_can_never_fit(tmp_path):
    orchestrator = DistributedEvaluationOrchestrator(tmp_path / "jobs.db", Inventory.from_spec("1xA10G-24GB"))
    request = {"model": {"path": "meta-llama/Llama-3.1-405B"}, "tasks": {"names": ["demo_mc"]}}
    with pytest.raises(EvalfleetError) as caught:
        orchestrator.submit_evaluation_request(request)
    message = str(caught.value)
    assert "can never run on this pool (1xA10G-24GB)" in message and "GB" in message and "\n" not in message
    assert orchestrator.list() == []


def test_submit_validates_the_request(tmp_path):
    orchestrator = DistributedEvaluationOrchestrator(tmp_path / "jobs.db", Inventory.from_spec("2xH100-80GB"))
    with pytest.raises(UsageError, match="tasks.names"):
        orchestrator.submit_evaluation_request({"model": {"path": "gpt2"}, "tasks": {"names": []}})
    with pytest.raises(UsageError, match="0 GPUs"):
        orchestrator.submit_evaluation_request({**_request("ok"), "gpus": 0})
    with pytest.raises(UsageError, match="no-such-model"):
        orchestrator.submit_evaluation_request({"model": {"path": "./no-such-model"}, "tasks": {"names": ["x"]}})
    job_id = orchestrator.submit_evaluation_request({**_request("ok", "high"), "gpus": 1})
    record = orchestrator.status(job_id)
    assert record.state is JobState.QUEUED and record.priority == "high"
    assert len(record.demand["tokens_per_s"]) == 1 and record.demand["work_tokens"] > 0
    assert record.plan["fits"] and record.request["tasks"]["names"] == ["ok"]


def test_jobs_run_to_success_in_priority_order(tmp_path):
    orchestrator = _orchestrator(tmp_path, slots=1)
    low = orchestrator.submit_evaluation_request(_request("ok", "low"))
    high = orchestrator.submit_evaluation_request(_request("ok", "high"))
    plan = asyncio.run(orchestrator.run_once())
    assert [s.job_id for s in plan.starts] == [high]
    assert _state(orchestrator, low) is JobState.QUEUED
    _run_until(orchestrator, lambda: _state(orchestrator, low) is JobState.SUCCEEDED)
    assert _state(orchestrator, high) is JobState.SUCCEEDED
    history = [e.to_state for e in orchestrator.store.events(low)]
    assert history == [JobState.QUEUED, JobState.PLACED, JobState.RUNNING, JobState.SUCCEEDED]
    assert orchestrator.status(low).placement == [(0, 0)]


def test_a_first_failure_retries_at_once_elsewhere_and_failures_in_a_row_back_off(tmp_path):
    """Attempt 1 fails: retried at once, on the other slot. Attempt 2 fails without computing
    anything (a crash loop): it waits the base backoff. Attempt 3 is the last."""
    clock = Clock()
    orchestrator = _orchestrator(tmp_path, clock=clock, recovery=RecoveryOptions(max_attempts=3, backoff_base_s=30))
    job = orchestrator.submit_evaluation_request(_request("fail"))
    _run_until(orchestrator, lambda: orchestrator.status(job).attempts == 1)
    record = orchestrator.status(job)  # requeued and placed again in the round that saw the exit
    assert record.state in (JobState.PLACED, JobState.RUNNING) and record.not_before == clock.now
    assert record.placement == [(0, 1)] and (record.avoid, record.failure_streak) == ([(0, 0)], 1)
    _run_until(orchestrator, lambda: orchestrator.status(job).attempts == 2)
    record = orchestrator.status(job)
    assert record.not_before == clock.now + 30 and (record.avoid, record.failure_streak) == ([(0, 1)], 2)
    clock.now += 10
    assert asyncio.run(orchestrator.run_once()).starts == ()
    clock.now += 25
    _run_until(orchestrator, lambda: _state(orchestrator, job) is JobState.FAILED)
    reasons = [e.reason for e in orchestrator.store.events(job)]
    assert "attempt 1 of 3 failed (exited with code 3); retry in 0s" in reasons
    assert "attempt 2 of 3 failed (exited with code 3); retry in 30s" in reasons
    assert "no attempts left" in reasons[-1]


def test_a_gpu_on_which_jobs_of_several_models_crash_is_quarantined(tmp_path):
    recovery = RecoveryOptions(max_attempts=1, quarantine_after=2)
    orchestrator = _orchestrator(tmp_path, slots=1, recovery=recovery)
    first = orchestrator.submit_evaluation_request(_request("fail"))
    again = orchestrator.submit_evaluation_request(_request("fail"))
    _run_until(orchestrator, lambda: _state(orchestrator, again) is JobState.FAILED)
    assert orchestrator.store.quarantined() == {}  # one model failing twice says nothing about the GPU
    second = orchestrator.submit_evaluation_request(_request("fail", model="mistralai/Mistral-7B-v0.1"))
    _run_until(orchestrator, lambda: _state(orchestrator, second) is JobState.FAILED)
    assert _state(orchestrator, first) is JobState.FAILED
    reason = orchestrator.store.quarantined()[(0, 0)]
    assert reason.startswith("jobs of 2 different models failed on GPU 0 of node 0")
    waiting = orchestrator.submit_evaluation_request(_request("ok"))
    plan = asyncio.run(orchestrator.run_once())
    assert plan.starts == () and "quarantined" in plan.waiting[waiting]


def test_restart_requeues_dead_jobs_and_adopts_live_ones(tmp_path):
    first = _orchestrator(tmp_path)
    doomed = first.submit_evaluation_request(_request("sleep"))
    alive = first.submit_evaluation_request(_request("sleep"))
    _run_until(first, lambda: all(_state(first, j) is JobState.RUNNING for j in (doomed, alive)))
    victim = psutil.Process(first.status(doomed).pid)
    os.killpg(victim.pid, signal.SIGKILL)
    psutil.wait_procs([victim], timeout=10)

    second = _orchestrator(tmp_path)  # a new scheduler process: same file, no memory of the first
    assert second.reconcile() == [doomed]
    record = second.status(doomed)
    assert record.state is JobState.QUEUED and record.attempts == 1 and record.pid is None
    assert "process was gone" in second.store.events(doomed)[-1].reason
    assert second.store.quarantined() == {}
    assert _state(second, alive) is JobState.RUNNING
    pid = second.status(alive).pid
    second.cancel(alive)
    assert psutil.wait_procs([psutil.Process(pid)], timeout=10)[1] == []
    second.cancel(doomed)
    first.store.close()


def test_cancel_queued_and_running_jobs(tmp_path):
    orchestrator = _orchestrator(tmp_path, slots=1)
    running = orchestrator.submit_evaluation_request(_request("sleep"))
    queued = orchestrator.submit_evaluation_request(_request("ok"))
    _run_until(orchestrator, lambda: _state(orchestrator, running) is JobState.RUNNING)
    assert orchestrator.cancel(queued).state is JobState.CANCELLED
    with pytest.raises(UsageError, match="already cancelled"):
        orchestrator.cancel(queued)
    process = psutil.Process(orchestrator.status(running).pid)
    orchestrator.cancel(running)
    blocked = orchestrator.submit_evaluation_request(_request("ok"))
    assert orchestrator.create_allocation_plan().starts == ()  # its GPU frees only once the process is gone
    psutil.wait_procs([process], timeout=10)
    _run_until(orchestrator, lambda: _state(orchestrator, blocked) is JobState.SUCCEEDED)
    assert _state(orchestrator, running) is JobState.CANCELLED


def test_cancel_from_another_process_reaches_the_owner(tmp_path):
    orchestrator = _orchestrator(tmp_path)
    job = orchestrator.submit_evaluation_request(_request("sleep"))
    _run_until(orchestrator, lambda: _state(orchestrator, job) is JobState.RUNNING)
    process = psutil.Process(orchestrator.status(job).pid)
    with JobStore(tmp_path / "jobs.db") as cli_store:  # what `evalfleet cancel` will do
        DistributedEvaluationOrchestrator(cli_store, slot_inventory(2, memory_gb=32)).cancel(job)
    _run_until(orchestrator, lambda: not process.is_running() or process.status() == psutil.STATUS_ZOMBIE)
    assert _state(orchestrator, job) is JobState.CANCELLED


def test_a_requeue_from_another_process_stops_the_old_attempt_first(tmp_path):
    orchestrator = _orchestrator(tmp_path, slots=1)
    job = orchestrator.submit_evaluation_request(_request("sleep"))
    _run_until(orchestrator, lambda: _state(orchestrator, job) is JobState.RUNNING)
    old = psutil.Process(orchestrator.status(job).pid)
    with JobStore(tmp_path / "jobs.db") as cli_store:
        other = DistributedEvaluationOrchestrator(cli_store, slot_inventory(1, memory_gb=32),
                                                  recovery=RecoveryOptions(backoff_base_s=0.0))
        assert other.handle_fault_recovery(job, "operator says the node is flaky").action == "requeued"
    assert old.is_running()
    plan = asyncio.run(orchestrator.run_once())
    assert plan.starts == ()  # the slot stays busy while the old process exits
    psutil.wait_procs([old], timeout=10)
    _run_until(orchestrator, lambda: _state(orchestrator, job) is JobState.RUNNING)
    assert orchestrator.status(job).pid != old.pid
    orchestrator.cancel(job)


def test_monitor_reports_progress_eta_and_attempt(tmp_path):
    clock = Clock()
    orchestrator = _orchestrator(tmp_path, clock=clock)
    job = orchestrator.submit_evaluation_request(_request("sleep"))
    _run_until(orchestrator, lambda: _state(orchestrator, job) is JobState.RUNNING)
    before = orchestrator.monitor_running_tasks()[0]
    assert before.done == 0 and before.eta_s > 0 and before.attempt == 1 and before.devices == ((0, 0),)
    orchestrator.store.update_progress(job, done=3, total=4, tokens_per_s=128.0, now=clock.now)
    progress = orchestrator.monitor_running_tasks()[0]
    work = orchestrator.status(job).demand["work_tokens"]
    assert (progress.job_id, progress.done, progress.total, progress.tokens_per_s) == (job, 3, 4, 128.0)
    assert progress.eta_s == pytest.approx(work / 4 / 128.0)
    orchestrator.cancel(job)


def test_preemption_stops_low_work_for_high_and_resumes_it(tmp_path):
    options = PolicyOptions(preemption=True, preempt_after_s=0.0)
    orchestrator = _orchestrator(tmp_path, slots=1, policy=options)
    low = orchestrator.submit_evaluation_request(_request("sleep", "low"))
    _run_until(orchestrator, lambda: _state(orchestrator, low) is JobState.RUNNING)
    high = orchestrator.submit_evaluation_request(_request("ok", "high"))
    plan = asyncio.run(orchestrator.run_once())
    assert plan.preempt == (low,) and _state(orchestrator, low) is JobState.PREEMPTED
    _run_until(orchestrator, lambda: _state(orchestrator, high) is JobState.SUCCEEDED)
    _run_until(orchestrator, lambda: _state(orchestrator, low) is JobState.RUNNING)
    states = [e.to_state for e in orchestrator.store.events(low)]
    assert states[-3:] == [JobState.QUEUED, JobState.PLACED, JobState.RUNNING]
    assert orchestrator.status(low).attempts == 0  # a preemption is not a failure
    orchestrator.cancel(low)


def test_a_silent_job_is_restarted_after_the_heartbeat_timeout(tmp_path):
    clock = Clock()
    orchestrator = _orchestrator(tmp_path, clock=clock, heartbeat_timeout_s=60.0)
    job = orchestrator.submit_evaluation_request(_request("sleep"))
    _run_until(orchestrator, lambda: _state(orchestrator, job) is JobState.RUNNING)
    pid = orchestrator.status(job).pid
    clock.now += 30
    orchestrator.store.heartbeat(job, now=clock.now)
    clock.now += 50
    asyncio.run(orchestrator.run_once())
    assert _state(orchestrator, job) is JobState.RUNNING
    clock.now += 11
    asyncio.run(orchestrator.run_once())
    record = orchestrator.status(job)  # retried at once, on the other slot, while the silent one is stopped
    assert record.state is JobState.RUNNING and record.pid != pid and record.placement == [(0, 1)]
    reasons = [e.reason for e in orchestrator.store.events(job)]
    assert "attempt 1 of 3 failed (no heartbeat for 61s); retry in 0s" in reasons
    assert psutil.wait_procs([psutil.Process(pid)], timeout=10)[1] == []


def _running_stall_watched(tmp_path, clock: Clock):
    """A running job on a scheduler whose stall bounds are 10 x the slowest batch (at least 30 s) and
    600 s before a batch is measured, with a 60 s heartbeat timeout; one slot, so that a retry waits
    for the stalled process to stop."""
    stall = StallBounds(floor_s=30.0, batch_factor=10.0, load_floor_s=600.0, load_factor=0.0)
    orchestrator = _orchestrator(tmp_path, slots=1, clock=clock, heartbeat_timeout_s=60.0, stall=stall)
    job = orchestrator.submit_evaluation_request(_request("sleep"))
    _run_until(orchestrator, lambda: _state(orchestrator, job) is JobState.RUNNING)
    return orchestrator, job


def test_a_job_that_heartbeats_but_stops_moving_is_stalled_and_retried_blaming_no_device(tmp_path):
    clock = Clock()
    orchestrator, job = _running_stall_watched(tmp_path, clock)
    record = orchestrator.status(job)
    store = orchestrator.store

    def beat_and_round(seconds: float) -> JobState:
        for _ in range(int(seconds // 50)):  # heartbeats keep coming all along
            clock.now += 50
            store.heartbeat(job, now=clock.now)
        clock.now += seconds % 50
        store.heartbeat(job, now=clock.now)
        asyncio.run(orchestrator.run_once())
        return _state(orchestrator, job)

    assert beat_and_round(590) is JobState.RUNNING  # loading: only the load bound applies
    store.update_progress(job, done=3, total=10, progress_at=clock.now, now=clock.now)
    assert beat_and_round(590) is JobState.RUNNING  # one batch done, none measured yet: still the load bound
    store.update_progress(job, done=4, total=10, progress_at=clock.now, slowest_batch_s=4.0, now=clock.now)
    assert beat_and_round(39) is JobState.RUNNING  # 10 x 4 s: a 40 s bound
    store.update_progress(job, done=10, total=10, progress_at=clock.now, slowest_batch_s=4.0, now=clock.now)
    assert beat_and_round(590) is JobState.RUNNING  # every request done: scoring is held to the load bound
    store.update_progress(job, done=10, total=20, progress_at=clock.now, slowest_batch_s=4.0, now=clock.now)
    assert beat_and_round(39) is JobState.RUNNING  # the next kind of request has begun: 40 s again
    assert beat_and_round(2) is JobState.QUEUED
    requeued = orchestrator.status(job)
    assert requeued.error.startswith("stalled: no request computed for 41s (bound 40s: 10 x its slowest batch"), \
        requeued.error
    assert requeued.attempts == 1
    assert store.device_failures(record.placement[0], since=0) == []
    assert psutil.wait_procs([psutil.Process(record.pid)], timeout=10)[1] == []


def test_a_job_that_never_finishes_a_batch_is_stalled_after_the_load_bound(tmp_path):
    clock = Clock()
    orchestrator, job = _running_stall_watched(tmp_path, clock)
    for _ in range(12):
        clock.now += 50
        orchestrator.store.heartbeat(job, now=clock.now)
    clock.now += 1
    asyncio.run(orchestrator.run_once())
    record = orchestrator.status(job)
    assert record.state is JobState.QUEUED
    assert record.error.startswith("stalled: no batch done since it started for 601s (bound 600s: no batch "), \
        record.error


def test_a_launch_that_fails_is_a_failed_attempt(tmp_path):
    orchestrator = DistributedEvaluationOrchestrator(
        tmp_path / "jobs.db", slot_inventory(1, memory_gb=32), SubprocessExecutor([str(tmp_path / "missing")])
    )
    job = orchestrator.submit_evaluation_request(_request("ok"))
    asyncio.run(orchestrator.run_once())
    record = orchestrator.status(job)
    assert record.state is JobState.QUEUED and record.attempts == 1 and "launch failed" in record.error


def test_run_forever_until_stopped(tmp_path):
    orchestrator = _orchestrator(tmp_path)
    job = orchestrator.submit_evaluation_request(_request("ok"))

    async def scenario():
        stop = asyncio.Event()
        loop = asyncio.create_task(orchestrator.run_forever(interval_s=0.02, stop=stop))
        for _ in range(1000):
            if _state(orchestrator, job) is JobState.SUCCEEDED:
                break
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(loop, 10)

    asyncio.run(scenario())
    assert _state(orchestrator, job) is JobState.SUCCEEDED


def test_planning_without_an_executor(tmp_path):
    orchestrator = DistributedEvaluationOrchestrator(tmp_path / "jobs.db", slot_inventory(2, memory_gb=32))
    job = orchestrator.submit_evaluation_request(_request("ok"))
    assert [s.job_id for s in orchestrator.create_allocation_plan().starts] == [job]
    with pytest.raises(EvalfleetError, match="no executor"):
        asyncio.run(orchestrator.run_once())
    assert orchestrator.handle_fault_recovery(job, "spurious").action == "ignored"
