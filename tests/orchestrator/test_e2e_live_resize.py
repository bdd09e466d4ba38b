"""End to end, for real: a data-parallel job widens and narrows while it runs.

`evalfleet scheduler --slots 2`: a data-parallel job starts on the one slot a high-priority
job leaves free; when that job ends, a second replica joins the running job (its first keeps
working); when another high-priority job arrives, the newest replica is given back after its
batch in hand and the high job starts on its slot. The job's per-sample results equal one
process's. Each rank batch is slowed (`slow_batch` fault) so the moves happen mid-job.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from faultenv import fault_env
from fleet import count_ahead, fleet_in, wait_for
from samples import compare_samples, load_samples, metric_differences

from evalfleet.orchestrator import JobState
from evalfleet.types import EvaluationRequest

pytestmark = pytest.mark.slow

ELASTIC = ("--tasks", "demo_mc", "--limit", "60", "--batch-size", "4", "--strategy", "dp", "--log-samples")


def _reasons(fleet, job_id: str) -> list[str]:
    return [e.reason or "" for e in fleet.events(job_id) if e.from_state is JobState.RUNNING
            and e.to_state is JobState.RUNNING]


def test_a_running_dp_job_grows_into_a_freed_slot_and_gives_it_back_to_a_high_job(tmp_path, tiny_model, monkeypatch):
    for name, value in fault_env("slow_batch:0.8").items():  # worker-group ranks only; slow enough that a loaded machine gives back mid-run
        monkeypatch.setenv(name, value)
    model = ("--model", str(tiny_model))
    first_high = (*model, "--tasks", "demo_arith", "--limit", "30", "--priority", "high")
    second_high = (*model, "--tasks", "demo_arith", "--limit", "5", "--priority", "high")
    elastic = (*model, *ELASTIC)
    count_ahead(tmp_path, first_high, second_high, elastic)
    with fleet_in(tmp_path) as fleet:
        fleet.start("--slots", "2", "--interval", "0.2")
        high = fleet.submit(*first_high)
        job = fleet.submit(*elastic)
        width = fleet.status(job)["width"]
        assert (width["fewest"], width["most"]) == (1, 2), width

        # It starts on the one free slot, as one replica in a worker group of its own.
        running = fleet.wait_state(job, JobState.RUNNING, timeout=90)
        assert len(running.placement) == 1
        wait_for(lambda: fleet.record(job).resize is not None, 60, "the job's replicas to be open to resizing")

        # The high job ends; its slot goes to the running job, whose new replica joins mid-run.
        fleet.wait_state(high, JobState.SUCCEEDED, timeout=90)
        wait_for(lambda: any("replica-1 joined" in r for r in _reasons(fleet, job)), 60, "a second replica to join")
        grown = fleet.record(job)
        assert grown.state is JobState.RUNNING and sorted(grown.placement) == [(0, 0), (0, 1)]
        assert fleet.status(job)["width"]["replicas"] == 2
        assert grown.done < grown.total, "the job ended before it could grow; slow its batches more"

        # A high job arrives: the newest replica finishes its batch and leaves; the high job runs there.
        second = fleet.submit(*second_high)
        placed = fleet.wait_state(second, JobState.RUNNING, JobState.SUCCEEDED, timeout=90)
        reasons = _reasons(fleet, job)
        assert any("asked to give back its replica" in r for r in reasons), reasons
        assert any("gave back" in r and "given back to the pool" in r for r in reasons), reasons
        given_back = [r for r in reasons if r.startswith("grows by a replica on ")][0].removeprefix(
            "grows by a replica on ")
        assert placed.placement == [tuple(int(x) for x in given_back.split(":"))]
        assert fleet.record(job).state is JobState.RUNNING  # its first replica kept working
        fleet.wait_state(second, JobState.SUCCEEDED, timeout=90)
        done = fleet.wait_state(job, JobState.SUCCEEDED, timeout=180)

    # Never preempted or restarted: one attempt, the same worker all along.
    assert done.attempts == 0 and not any(e.to_state is JobState.PREEMPTED for e in fleet.events(job))
    document = json.loads(Path(done.result_path).read_text())
    layout = document["evalfleet"]["layout"]
    changes = [(c["change"], c["replica"]) for c in layout["replica_changes"]]
    assert changes[:2] == [("added", "replica-1"), ("retired", "replica-1")], changes
    assert all(count > 0 for count in layout["batches_per_replica"].values()), layout["batches_per_replica"]

    from evalfleet.engines.run import evaluate_request

    reference = evaluate_request(EvaluationRequest.model_validate({
        "model": {"path": str(tiny_model)}, "tasks": {"names": "demo_mc", "limit": 60}, "batch_size": "4",
        "log_samples": True, "use_cache": False, "output_dir": str(tmp_path / "reference"),
    }))
    assert compare_samples(load_samples(tmp_path / "reference"), load_samples(Path(done.result_path).parent)) == []
    assert metric_differences(reference.document(), document) == []
