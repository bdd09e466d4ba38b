"""The chaos soak, short and seeded: `benchmarks/chaos.py --short` as a subprocess.

Three small jobs (one data-parallel, so it has rank processes) run on `evalfleet scheduler
--slots 2` without faults, then again while one fault of each local kind lands on a job that
is computing: its worker and one of its ranks SIGKILLed, the scheduler SIGKILLed and started
again, the store's write lock held past its busy timeout, the results folder's disk full, one
rank out of memory. Every job must succeed with the reference's metrics; nothing may be lost,
hung or quarantined, and each fault's recovery (fault to the job's next batch) must be measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "chaos.py"
LOCAL_FAULTS = ("worker_kill", "rank_kill", "scheduler_kill", "store_lock", "disk_full", "oom")


def test_a_short_chaos_soak_loses_nothing_and_changes_no_metric(tmp_path):
    out = tmp_path / "chaos.json"
    done = subprocess.run([sys.executable, str(BENCHMARK), "--short", "--seed", "1", "--work", str(tmp_path / "work"),
                           "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert out.exists(), done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    details = json.dumps({k: report[k] for k in ("per_job", "fault_log")}, indent=1)
    assert report["jobs_succeeded"] == report["jobs"] == 3, details
    assert report["jobs_lost"] == report["jobs_hung"] == report["jobs_failed"] == 0, details
    assert all(report["metrics_equal_to_reference"].values()), details
    assert report["devices_quarantined"] == 0, report["quarantined"]
    for kind in LOCAL_FAULTS:  # each fault found a computing job to hit
        assert report["faults_injected"].get(kind, {}).get("hit", 0) >= 1, (kind, details)
    # Each fault's job computed again afterwards (or its retry found everything cached), and the time it
    # took is measured; a rank killed or out of memory is recovered inside its job, never by a new attempt.
    recovery = report["recovery_by_kind"]
    assert set(recovery) == set(LOCAL_FAULTS), recovery
    assert all(row["recovered"] == row["faults"] and row["max_s"] >= row["median_s"] >= 0
               for row in recovery.values()), json.dumps(report["recoveries"], indent=1)
    assert recovery["rank_kill"]["through_scheduler"] == recovery["oom"]["through_scheduler"] == 0, recovery
    assert recovery["worker_kill"]["through_scheduler"] == recovery["worker_kill"]["faults"], recovery
    assert report["ok"] and done.returncode == 0, done.stderr[-4000:]
