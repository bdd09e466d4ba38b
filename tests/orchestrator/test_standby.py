"""The scheduler's standby worker: a process that did a worker's imports before it had a job.

A real `evalfleet scheduler --slots 2` runs the same job twice: the first in a process of its
own, the second in the standby the first launch started. Both give the same metrics, and the
second took on its job's environment (its share of the cores) and log. A standby that was never
handed a job leaves with the scheduler, stopped or SIGKILLed, and a restarted scheduler that adopts
a running job warms one for that job's retry.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from faultenv import fault_env
from fleet import Fleet, fleet_in, gone, wait_for
from samples import metric_differences

from evalfleet.orchestrator import JobState

pytestmark = pytest.mark.slow

JOB = ("--model", "demo", "--tasks", "demo_mc,demo_arith", "--limit", "8", "--no-cache")


def _results(fleet: Fleet, job_id: str) -> dict:
    return json.loads(Path(fleet.record(job_id).result_path).read_text())


def test_a_job_handed_to_the_standby_runs_as_in_a_process_of_its_own(tmp_path):
    with fleet_in(tmp_path) as fleet:
        fleet.start("--slots", "2", "--interval", "0.2")
        first = fleet.submit(*JOB)
        fleet.wait_state(first, JobState.SUCCEEDED, timeout=120)
        assert fleet.record(first).handle["standby"] is False
        standby = wait_for(lambda: fleet.standby(), 90, "a standby that has done its imports")

        second = fleet.submit(*JOB)
        record = fleet.wait_state(second, JobState.SUCCEEDED, timeout=120)
        assert record.handle["standby"] is True and record.pid == standby.pid
        ours, theirs = _results(fleet, first), _results(fleet, second)
        assert metric_differences(theirs, ours) == []
        assert theirs["evalfleet"]["cache"]["computed"] == ours["evalfleet"]["cache"]["computed"] > 0
        # One of two slots on this machine's cores: the job's thread share, not the standby's default.
        assert theirs["evalfleet"]["hardware"]["cpu_threads"] == max(1, (os.cpu_count() or 1) // 2)
        assert f"job {second} finished" in Path(record.handle["log"]).read_text()
        # The next standby is on its way; a stopped scheduler takes it along (fleet_in checks).
        wait_for(lambda: fleet.standby(), 90, "the next standby")


def test_a_killed_scheduler_takes_its_standby_along_and_the_next_warms_one_for_the_job_it_adopts(
        tmp_path, monkeypatch):
    for key, value in fault_env("slow_batch:0.5").items():  # a job still computing across both schedulers
        monkeypatch.setenv(key, value)
    with fleet_in(tmp_path) as fleet:
        fleet.start("--slots", "2", "--interval", "0.2")
        job = fleet.submit("--model", "demo", "--tasks", "demo_mc,demo_arith", "--limit", "12", "--batch-size", "1",
                           "--strategy", "dp")  # ranks, whose batches the fault slows
        worker = fleet.wait_state(job, JobState.RUNNING, timeout=120).pid
        standby = wait_for(fleet.standby, 90, "a standby that has done its imports")
        fleet.process.send_signal(signal.SIGKILL)
        fleet.process.wait(30)
        fleet.process = None
        wait_for(lambda: gone(standby.pid), 30, "the standby to leave with its scheduler")
        assert not gone(worker) and fleet.record(job).state is JobState.RUNNING

        # The next scheduler adopts the job and warms a standby, which its retry then runs in.
        fleet.start("--slots", "2", "--interval", "0.2")
        standby = wait_for(fleet.standby, 90, "the new scheduler's standby")
        assert fleet.record(job).state is JobState.RUNNING and fleet.record(job).pid == worker
        os.kill(worker, signal.SIGKILL)
        record = fleet.wait_state(job, JobState.SUCCEEDED, timeout=180)
        assert record.handle["standby"] is True and record.pid == standby.pid != worker
        assert fleet.status(job)["failures"] == 1


def test_a_standby_killed_after_it_was_ready_is_replaced_and_one_killed_before_turns_standbys_off(tmp_path):
    import sys
    import time

    from evalfleet.orchestrator.executors.process import SubprocessExecutor

    command = [sys.executable, "-m", "evalfleet.cli", "worker"]
    for ready_first in (True, False):
        executor = SubprocessExecutor(command, log_dir=tmp_path, standby=True)
        executor._warm_standby()
        standby = executor._standby
        while ready_first and not standby.ready():
            time.sleep(0.2)
        os.killpg(standby.process.pid, signal.SIGKILL)
        standby.process.wait()
        assert executor._hand_to_standby(command, {}, None) is None
        assert executor._standby is None and standby.process.returncode is not None
        executor._warm_standby()
        # Killed once ready: replaced. Never ready (a crash, or CUDA touched by the imports): off.
        assert (executor._standby is not None) is ready_first
        executor.close()
