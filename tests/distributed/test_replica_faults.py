"""Faults inside the worker-group runner that must end a run, never hang it, and be classed right.

A replica whose restart raises (here a real OSError: the temporary folder its ranks log to
cannot be made) counts as failed, so a run with no replica left fails as infrastructure. A
batch that crashes replicas on two different devices (the `crash_on_token` fault, a real
SIGKILL in the rank) is a poison batch: deterministic, not retried, no device blamed.

CPU over gloo, one thread per rank.
"""

from __future__ import annotations

import os
import signal
import tempfile

import pytest
from bounded import bounded
from distributed_support import alive, run_all
from faultenv import fault_env

from evalfleet.orchestrator.failures import DeviceEvidence, FailureClass, classify, exit_report
from evalfleet.runtime.backends.base import LoglikelihoodItem
from evalfleet.runtime.group import GroupSpec
from evalfleet.runtime.workers import PoisonBatch, WorkerGroupRunner
from evalfleet.types import InfrastructureError

pytestmark = pytest.mark.slow

POISON_TOKEN = 1  # make_requests draws tokens from 2 up, so only the planted request holds it


def start_runner(model, dp: int, **kwargs) -> WorkerGroupRunner:
    spec = GroupSpec(str(model), dtype="float32", device="cpu", threads=1)
    return WorkerGroupRunner(spec, [["cpu"]] * dp, **kwargs).start()


def bounded_run(runner, batches, timeout: float = 120.0):
    """What `run_all` raised (None if it finished), failing the test if the run still waits after `timeout`."""
    return bounded(lambda: run_all(runner, batches), timeout, "the run: a replica that could not restart hung it")


def test_a_replica_that_cannot_restart_fails_the_run_instead_of_hanging_it(llama, requests_and_reference,
                                                                           monkeypatch, tmp_path):
    batches, _ = requests_and_reference
    runner = start_runner(llama, dp=1, max_restarts=2)
    try:
        (pid,) = runner.worker_pids()[0]
        # From now on a group's start cannot make its log folder: a real FileNotFoundError from mkdtemp.
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
        os.kill(pid, signal.SIGKILL)
        outcome = bounded_run(runner, batches)
        (replica,) = runner.replicas
    finally:
        monkeypatch.undo()
        runner.close()
    assert isinstance(outcome, InfrastructureError) and "every replica failed" in str(outcome), outcome
    assert classify(outcome) is FailureClass.INFRASTRUCTURE
    assert replica.restarts == 2 and replica.group is None and runner.replica_names == []
    # The crash, then each failed restart, in the replica's record.
    assert "stopped (signal 9)" in replica.failures[0], replica.failures
    assert [f.startswith("replica-0 did not restart: FileNotFoundError") for f in replica.failures[1:]] == [True, True]
    assert not alive([pid])


def test_a_batch_that_crashes_replicas_on_two_devices_fails_the_run_as_deterministic(llama, requests_and_reference):
    batches, _ = requests_and_reference
    scored = [batch for batch in batches if isinstance(batch[0], LoglikelihoodItem)][:3]
    poisoned = [LoglikelihoodItem((POISON_TOKEN, 5, 6), (7, 8)), *scored[1][1:]]
    runner = start_runner(llama, dp=2, max_restarts=1, env=fault_env(f"crash_on_token:{POISON_TOKEN}"))
    try:
        outcome = bounded_run(runner, [scored[0], poisoned, scored[2]])
        failures = {replica.name: list(replica.failures) for replica in runner.replicas}
        restarts = runner.describe()["restarts"]
    finally:
        runner.close()
    assert isinstance(outcome, PoisonBatch), outcome
    message = str(outcome)
    assert message == ("batch 1 crashed replica-0 (CPU) and replica-1 (CPU) on different devices, so the batch itself "
                       "is at fault: its first request is a log-likelihood request of 3 context and 2 continuation "
                       "tokens (context 1, 5, 6)")
    assert (outcome.index, outcome.first) == (1, poisoned[0])
    # Each replica crashed once on it; the first was restarted, the second ended the run: no third try.
    assert all(len(f) == 1 and "stopped (signal 9) while batch 1" in f[0] for f in failures.values()), failures
    assert restarts == 1
    # Not retried, and no device blamed, even where the GPUs reported faults when it failed.
    report = exit_report(outcome, message, [DeviceEvidence(device=(0, 0), findings=["Xid 43 (1 event)"])])
    assert report.failure is FailureClass.DETERMINISTIC and not report.failure.retried and not report.blame_devices


def test_the_same_batch_crashing_one_device_twice_is_not_a_poison_batch(llama, requests_and_reference):
    """The converse: a single replica (one device) crashed by the batch again and again says nothing
    about the batch; the run ends when its restarts are used up, as infrastructure."""
    batches, _ = requests_and_reference
    poisoned = [[LoglikelihoodItem((POISON_TOKEN, 5, 6), (7, 8))]]
    runner = start_runner(llama, dp=1, max_restarts=1, env=fault_env(f"crash_on_token:{POISON_TOKEN}"))
    try:
        outcome = bounded_run(runner, poisoned)
    finally:
        runner.close()
    assert isinstance(outcome, InfrastructureError) and "every replica failed" in str(outcome), outcome
