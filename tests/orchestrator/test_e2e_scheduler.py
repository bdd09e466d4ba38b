"""End to end, for real: `evalfleet scheduler --slots 2` with real workers evaluating real models.

One scheduler runs four jobs of different priorities: a worker is SIGKILLed mid-job and
its job resumes from the request cache with the results of an uninterrupted run; a job
cancelled mid-run frees its slot; the high-priority job starts before the low one.
"""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fleet import Fleet, count_ahead, fleet_in, gone, wait_for
from samples import compare_samples, load_samples, metric_differences

from evalfleet.orchestrator import JobState
from evalfleet.types import EvaluationRequest

pytestmark = pytest.mark.slow

LONG_TASKS = "demo_mc,demo_ppl,demo_arith"


@pytest.fixture
def fleet(tmp_path):
    with fleet_in(tmp_path) as fleet:
        yield fleet


def _placements(fleet: Fleet) -> list[tuple[str, tuple]]:
    return [(e.job_id, e.at) for e in fleet.events() if e.to_state is JobState.PLACED]


def test_priorities_kill_resume_and_cancel_on_two_slots(fleet, tiny_model, tmp_path):
    fleet.start("--slots", "2", "--interval", "0.2", "--backoff", "0")
    refused = fleet.cli("submit", "--model", "meta-llama/Llama-3.1-405B", "--tasks", "demo_mc", expect=1)
    assert refused.stdout == "" and refused.stderr.count("\n") == 1
    assert "can never run on this pool (2 CPU slots)" in refused.stderr

    # Two long jobs fill both slots; then a low and a high one queue, the low one first.
    submits = [("--model", "demo", "--tasks", LONG_TASKS, "--batch-size", "1", "--log-samples"),
               ("--model", str(tiny_model), "--tasks", LONG_TASKS, "--batch-size", "1"),
               ("--model", str(tiny_model), "--tasks", "demo_arith", "--limit", "3", "--priority", "low"),
               ("--model", str(tiny_model), "--tasks", "demo_arith", "--limit", "3", "--priority", "high")]
    count_ahead(tmp_path, *submits)  # the doomed job must still run when the last one is queued
    long, doomed, low, high = (fleet.submit(*args) for args in submits)

    # Once both run: cancel one (its worker stops, its slot goes to a queued job) while the
    # other's worker is SIGKILLed as soon as some of its requests are in the cache.
    running = fleet.wait_state(doomed, JobState.RUNNING, timeout=90)
    doomed_slot = running.placement[0]
    fleet.wait_state(long, JobState.RUNNING, timeout=90)
    with ThreadPoolExecutor(1) as pool:
        cancelling = pool.submit(fleet.cli, "cancel", doomed)

        def computing():
            record = fleet.record(long)
            return record if record.state is JobState.RUNNING and 0 < record.done < (record.total or 0) else None

        victim = wait_for(computing, 90, "the long job to be computing")
        os.kill(victim.pid, signal.SIGKILL)
        cancelling.result()
    wait_for(lambda: gone(running.pid), 30, "the cancelled worker to exit")
    cancelled_at = fleet.events(doomed)[-1].at
    assert fleet.record(doomed).state is JobState.CANCELLED

    for job in (high, long, low):
        fleet.wait_state(job, JobState.SUCCEEDED, timeout=150)
    fleet.workers()

    # Priorities: after the first two, the queue started high, then the retried normal job, then low.
    order = [job for job, _ in _placements(fleet)]
    assert order[:2] in ([long, doomed], [doomed, long])
    assert order[2:] == [high, long, low], fleet.log.read_text()
    after_cancel = [e for e in fleet.events() if e.to_state is JobState.PLACED and e.at >= cancelled_at]
    assert after_cancel, "nothing started after the cancellation"
    placed_on_freed_slot = [fleet.record(e.job_id).placement for e in after_cancel]
    assert [doomed_slot] in placed_on_freed_slot
    assert not (fleet.db.parent / "results" / doomed / "results.json").exists()

    # The killed job was retried, resumed from the cache, and equals an uninterrupted run.
    status = fleet.status(long)
    assert status["state"] == "succeeded" and status["priority"] == "normal"
    assert status["attempts"] == 2 and status["failures"] == 1
    assert status["progress"]["done"] == status["progress"]["total"] > 0
    assert any("killed by SIGKILL" in (e["reason"] or "") for e in status["events"])
    result_path = Path(status["result_path"])
    assert result_path == fleet.db.parent / "results" / long / "results.json"
    document = json.loads(result_path.read_text())
    assert document["evalfleet"]["cache"]["hits"] > 0 and document["evalfleet"]["cache"]["computed"] > 0
    assert "monitoring" in document["evalfleet"]
    # Its size, counted at submit from its tasks and tokenizer, is what the run went through.
    assert status["size"]["source"] == "counted"
    assert status["size"]["requests_by_type"] == document["evalfleet"]["timing"]["requests_by_type"]

    from evalfleet.engines.run import evaluate_request

    reference = evaluate_request(EvaluationRequest.model_validate({
        "model": {"path": "demo"}, "tasks": {"names": LONG_TASKS}, "log_samples": True, "use_cache": False,
        "output_dir": str(tmp_path / "reference"),
    }))
    assert compare_samples(load_samples(tmp_path / "reference"), load_samples(result_path.parent)) == []
    assert metric_differences(reference.document(), document) == []
    assert fleet.status(high)["failures"] == 0 and fleet.status(low)["attempts"] == 1
    # Each job names the source of its estimate; the first ones were submitted before any run
    # measured a speed, so at least one is modeled. A finished job that computed something (the
    # resumed one did; the others found every answer in the shared cache) is set against its run.
    estimates = [fleet.status(job)["estimate"] for job in (high, long, low)]
    assert {estimate["source"] for estimate in estimates} <= {"modeled", "measured", "partly measured"}
    assert any(estimate["source"] == "modeled" for estimate in estimates)
    resumed = fleet.status(long)["estimate"]
    assert resumed["measured_seconds"] > 0 and resumed["predicted_over_measured"] > 0, resumed


def test_sigterm_requeues_running_work_and_a_new_scheduler_resumes_it(fleet):
    fleet.start("--slots", "2", "--interval", "0.2")
    job = fleet.submit("--model", "demo", "--tasks", LONG_TASKS, "--batch-size", "1")
    running = fleet.wait_state(job, JobState.RUNNING, timeout=90)
    wait_for(lambda: fleet.record(job).done > 0, 60, "the job to compute")
    second = fleet.cli("scheduler", "--slots", "1", expect=1)
    assert "a scheduler is already running" in second.stderr

    assert fleet.stop() == 0, fleet.log.read_text()
    assert gone(running.pid)
    record = fleet.record(job)
    assert record.state is JobState.QUEUED and record.attempts == 0 and record.pid is None
    assert "scheduler stopped" in fleet.log.read_text()

    # A wrong request is refused at submit, where its tasks are counted: nothing is queued.
    # (A request a worker finds wrong fails at once, without retries: test_local_executor.py.)
    wrong = fleet.cli("submit", "--model", "demo", "--tasks", "no_such_task", expect=2)
    assert wrong.stdout == "" and "unknown task 'no_such_task'" in wrong.stderr
    assert len(json.loads(fleet.cli("status", "--json").stdout)) == 1
    fleet.start("--slots", "2", "--interval", "0.2")
    finished = fleet.wait_state(job, JobState.SUCCEEDED, timeout=90)
    document = json.loads(Path(finished.result_path).read_text())
    assert document["evalfleet"]["cache"]["hits"] > 0
