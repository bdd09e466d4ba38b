"""The scheduler's standby worker: a process that did a worker's imports before it had a job.

A real `evalfleet scheduler --slots 2` runs the same job twice: the first in a process of its
own, the second in the standby the first launch started. Both give the same metrics, and the
second took on its job's environment (its share of the cores) and log. A standby that was never
handed a job leaves with the scheduler, stopped or SIGKILLed.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
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


def test_a_standby_leaves_when_its_scheduler_is_killed(tmp_path):
    with fleet_in(tmp_path) as fleet:
        fleet.start("--slots", "2", "--interval", "0.2")
        job = fleet.submit("--model", "demo", "--tasks", "demo_arith", "--limit", "2")
        worker = fleet.wait_state(job, JobState.SUCCEEDED, timeout=120).pid
        wait_for(lambda: gone(worker), 60, "the job's worker to exit")
        standby = wait_for(lambda: fleet.standby(), 90, "a standby that has done its imports")
        fleet.process.send_signal(signal.SIGKILL)
        fleet.process.wait(30)
        fleet.process = None
        wait_for(lambda: gone(standby.pid), 30, "the standby to leave with its scheduler")
