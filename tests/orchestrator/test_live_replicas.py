"""The worker's side of live resizing, against a real worker group and a real job store.

Orders that cannot be carried out must never leave devices held or lost: a replica that
fails to load (a real load failure, planted in its ranks) gives its devices back; an order
to drop a job's last replica, or one it does not have, leaves the job as it was.
"""

from __future__ import annotations

import time

import pytest
from faultenv import fault_env
from fleet import wait_for

from evalfleet.orchestrator.live_replicas import LiveReplicas, rank_devices
from evalfleet.orchestrator.states import JobState
from evalfleet.orchestrator.store import JobStore
from evalfleet.runtime.group import GroupSpec
from evalfleet.runtime.workers import WorkerGroupRunner

pytestmark = pytest.mark.slow


def test_rank_devices_are_the_cpu_or_the_replicas_own_gpus():
    assert rank_devices([(0, 3)], {"CUDA_VISIBLE_DEVICES": ""}) == ["cpu"]
    assert rank_devices([(0, 4), (0, 5)], {"CUDA_VISIBLE_DEVICES": "4,5"}) == ["cuda:0", "cuda:1"]


def _reasons(store: JobStore, job: str) -> list[str]:
    return [e.reason or "" for e in store.events(job) if e.from_state is JobState.RUNNING]


def test_orders_that_cannot_be_carried_out_leave_the_job_as_it_was(tmp_path, tiny_model):
    db = tmp_path / "jobs.db"
    with JobStore(db) as store:
        job = store.add({"model": "m"}, priority="normal", max_attempts=1)
        store.transition(job, JobState.PLACED, placement=[(0, 0)])
        store.transition(job, JobState.RUNNING)
        runner = WorkerGroupRunner(GroupSpec(str(tiny_model)), [["cpu"]]).start()
        live = LiveReplicas(db, job, [(0, 0)], 1, poll_s=0.05)
        try:
            # A job that stopped running before its runner was ready keeps its width, and runs on.
            queued = store.add({"model": "m"}, priority="normal", max_attempts=1)
            LiveReplicas(db, queued, [(0, 0)], 1).attach(runner)
            assert store.get(queued).resize is None

            live.attach(runner)
            record = store.get(job)
            assert record.resize["replicas"] == {"replica-0": [[0, 0]]} and record.resize["load_s"] > 0

            # A replica whose ranks fail to load (out of memory at load, for real in those ranks).
            store.order_growth(job, [(0, 1)], {"CUDA_VISIBLE_DEVICES": "", "EVALFLEET_THREADS": "1",
                                               **fault_env("oom_at_load")})
            assert store.get(job).placement == [(0, 0), (0, 1)]
            wait_for(lambda: any("failed to start" in r for r in _reasons(store, job)), 60, "the failed join")
            record = store.get(job)
            assert record.placement == [(0, 0)] and record.resize["joining"] == []
            assert runner.replica_names == ["replica-0"]

            # Its last replica, and a replica it does not have: both kept, nothing freed.
            store.order_shrink(job, [(0, 0)], "test")
            store.order_shrink(job, [(0, 7)], "test")
            wait_for(lambda: sum("keeps its replica" in r for r in _reasons(store, job)) == 2, 30, "two refusals")
            record = store.get(job)
            assert record.placement == [(0, 0)] and record.resize["leaving"] == []
            assert runner.replica_names == ["replica-0"]
        finally:
            live.attach(None)
            runner.close()
        # Detached, it takes no more orders (the scheduler's growth waits in the store).
        store.order_growth(job, [(0, 2)], {})
        time.sleep(0.3)
        assert len(store.get(job).resize["grow"]) == 1
