"""Failure classes against a real store: who is retried, who is blamed, what `pool` and `release` show."""

from __future__ import annotations

import json

import pytest
from clitools import run_main

from evalfleet.orchestrator import JobState, JobStore, RecoveryOptions
from evalfleet.orchestrator.failures import DeviceEvidence, FailureClass, classify
from evalfleet.orchestrator.pool import record_pool
from evalfleet.orchestrator.pool_status import pool_status, release_device
from evalfleet.orchestrator.recovery import recover
from evalfleet.planning import Inventory
from evalfleet.types import EvalfleetError, InfrastructureError, ResourceError, UsageError

OPTIONS = RecoveryOptions(max_attempts=3, backoff_base_s=0, quarantine_after=3)


def _running(store: JobStore, model: str, devices=((0, 0), (0, 1))) -> str:
    job = store.add({"model": {"path": model}, "tasks": {"names": ["demo_mc"]}}, priority="normal",
                    max_attempts=3, now=0.0)
    store.transition(job, JobState.PLACED, placement=list(devices), now=0.0)
    store.transition(job, JobState.RUNNING, now=0.0)
    return job


@pytest.mark.parametrize(
    ("error", "failure"),
    [
        (UsageError("bad flag"), FailureClass.REQUEST),
        (EvalfleetError("gpt2 models have no tensor-parallel plan"), FailureClass.DETERMINISTIC),
        (ResourceError("does not fit"), FailureClass.RESOURCE),
        (InfrastructureError("every replica failed"), FailureClass.INFRASTRUCTURE),
        (TimeoutError("collective timed out"), FailureClass.INFRASTRUCTURE),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), FailureClass.INFRASTRUCTURE),
        (MemoryError(), FailureClass.RESOURCE),
        (KeyError("lm_head"), FailureClass.DETERMINISTIC),
    ],
)
def test_errors_are_classified_where_they_are_raised(error, failure):
    assert classify(error) is failure


@pytest.mark.parametrize("failure", [FailureClass.REQUEST, FailureClass.DETERMINISTIC, FailureClass.RESOURCE])
def test_failures_a_retry_would_repeat_fail_once_and_blame_nothing(tmp_path, failure):
    with JobStore(tmp_path / "jobs.db") as store:
        for n in range(3):  # three different models, so even the distinct-model rule would fire if it counted
            job = _running(store, f"model-{n}")
            decision = recover(store, job, "the reason", 10.0 + n, OPTIONS, failure=failure)
            assert (decision.action, decision.attempts, decision.quarantined) == ("failed", 1, ())
            assert "the reason" in store.get(job).error and failure.value in store.events(job)[-1].reason
        assert store.quarantined() == {}
        assert store.device_failures((0, 0), since=0) == []


def test_one_model_failing_again_and_again_does_not_quarantine_but_three_models_do(tmp_path):
    with JobStore(tmp_path / "jobs.db") as store:
        for n in range(4):
            decision = recover(store, _running(store, "same-model"), "killed by SIGKILL", 10.0 + n, OPTIONS)
            assert decision.action == "requeued" and decision.quarantined == ()
        assert store.quarantined() == {}
        recover(store, _running(store, "other-model"), "killed by SIGKILL", 20.0, OPTIONS)
        decision = recover(store, _running(store, "third-model"), "no heartbeat for 130s", 21.0, OPTIONS)
        assert decision.quarantined == ((0, 0), (0, 1))
        (record, _) = store.quarantine_records()
        assert record["reason"].startswith("jobs of 3 different models failed on GPU 0 of node 0")
        assert "third-model: no heartbeat for 130s" in record["evidence"]


def test_device_evidence_quarantines_that_device_at_once_and_pool_shows_it(tmp_path):
    with JobStore(tmp_path / "jobs.db") as store:
        record_pool(store, Inventory.from_spec("4xA10G-24GB"), max_attempts=3)
        failed = _running(store, "m", devices=((0, 2), (0, 3)))
        holder = _running(store, "n", devices=((0, 0),))
        evidence = (DeviceEvidence(device=(0, 3), findings=["Xid 79 (1 event)"]),)
        decision = recover(store, failed, "rank 1 stopped (signal 6)", 5.0, OPTIONS, evidence=evidence)
        assert decision.action == "requeued" and decision.quarantined == ((0, 3),)
        status = pool_status(store)
        assert status.source == "scheduler"
        gpus = {device.gpu: device for device in status.nodes[0].gpus}
        assert (gpus[0].job, gpus[0].job_state) == (holder, "running")
        assert gpus[2].job is None and gpus[2].quarantine is None
        assert gpus[3].quarantine.evidence == ["Xid 79 (1 event)"]
        assert [(q.node, q.gpu) for q in status.quarantined] == [(0, 3)]
        assert release_device(store, "0:3") == (0, 3) and store.quarantined() == {}
        with pytest.raises(UsageError, match="GPU 3 of node 0 is not quarantined"):
            release_device(store, "3")
        with pytest.raises(UsageError, match="is not NODE:GPU or GPU"):
            release_device(store, "gpu3")


def test_pool_and_release_commands(tmp_path, capsys, monkeypatch):
    db = str(tmp_path / "jobs.db")
    with JobStore(db) as store:
        record_pool(store, Inventory.from_spec("2xA10G-24GB"), max_attempts=3)
        store.quarantine((0, 1), "GPU 1 of node 0 reported Xid 79", evidence=["Xid 79 (1 event)"])
    code, out, err = run_main(["pool", "--json", "--db", db], capsys, monkeypatch)
    assert code == 0, err
    document = json.loads(out)
    assert [q["evidence"] for q in document["quarantined"]] == [["Xid 79 (1 event)"]]
    assert [gpu["quarantine"] is not None for gpu in document["nodes"][0]["gpus"]] == [False, True]
    code, out, _ = run_main(["pool", "--db", db], capsys, monkeypatch)
    assert code == 0 and "reported Xid 79" in out
    code, _, err = run_main(["release", "0:1", "--db", db], capsys, monkeypatch)
    assert code == 0 and "GPU 1 of node 0 is back in the pool" in err
    code, _, err = run_main(["release", "0:1", "--db", db], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "not quarantined" in err and "Traceback" not in err
    code, out, _ = run_main(["pool", "--json", "--db", db], capsys, monkeypatch)
    assert json.loads(out)["quarantined"] == []


def test_the_backoff_grows_only_with_failures_in_a_row_that_computed_nothing(tmp_path):
    """Attempts that computed something (`progress_at` set) retry at once however many came before;
    the first that computes nothing after one that failed at once waits the base, the next twice it."""
    options = RecoveryOptions(max_attempts=10, backoff_base_s=30.0)
    with JobStore(tmp_path / "jobs.db") as store:
        job = _running(store, "m")
        delays = []
        for n, computed in enumerate([True, True, False, False, True, False]):
            if computed:
                store.update_progress(job, done=n + 1, progress_at=100.0 * n)
            failed_on = store.get(job).placement
            decision = recover(store, job, "killed by SIGKILL", 100.0 * n + 1, options)
            delays.append(decision.retry_at - (100.0 * n + 1))
            assert store.get(job).avoid == failed_on
            store.transition(job, JobState.PLACED, placement=[[0, n % 2]], progress_at=None, now=100.0 * n + 2)
            store.transition(job, JobState.RUNNING, now=100.0 * n + 2)
        assert delays == [0.0, 0.0, 30.0, 60.0, 0.0, 30.0]
        assert store.get(job).failure_streak == 2
