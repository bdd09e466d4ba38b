"""Replicas that join and leave a run in progress: every batch still reported once, same numbers.

CPU over gloo, one thread per rank. A batch slowed down in the ranks (the `slow_batch` fault)
keeps the run going while a replica loads or leaves.
"""

from __future__ import annotations

import threading

import pytest
from distributed_support import alive, differences, run_all
from faultenv import fault_env

from evalfleet.runtime.backends.base import LoglikelihoodItem
from evalfleet.runtime.group import GroupSpec
from evalfleet.runtime.workers import WorkerGroupRunner
from evalfleet.types import EvalfleetError

pytestmark = pytest.mark.slow

# Data parallelism runs the very kernels of one process on the same shapes (test_workers' "dp").
TOLERANCE = (1e-6, 1e-7)


@pytest.fixture(scope="module")
def scored(requests_and_reference):
    """12 log-likelihood batches (left-padded, several lengths: the reference's four, three times) and their results."""
    batches, reference = requests_and_reference
    pairs = [(batch, results) for batch, results in zip(batches, reference) if isinstance(batch[0], LoglikelihoodItem)]
    return [batch for batch, _ in pairs] * 3, [results for _, results in pairs] * 3


class AfterFirstBatch:
    """A runner that calls `hook` once its first batch is done, for `run_all` to check the rest."""

    def __init__(self, runner: WorkerGroupRunner, hook) -> None:
        self.runner, self.hook, self.fired = runner, hook, False

    def run(self, batches, on_batch_done) -> None:
        def done(index, results):
            on_batch_done(index, results)
            if not self.fired:
                self.fired = True
                self.hook()

        self.runner.run(batches, done)


def start_runner(model, dp: int, fault: str) -> WorkerGroupRunner:
    spec = GroupSpec(str(model), dtype="float32", device="cpu", threads=1)
    return WorkerGroupRunner(spec, [["cpu"]] * dp, env=fault_env(fault)).start()


def test_a_replica_added_mid_run_takes_batches_and_changes_no_result(llama, scored):
    batches, reference = scored
    runner = start_runner(llama, dp=1, fault="slow_batch:2.0")
    errors: list[BaseException] = []

    def add() -> None:
        try:  # without the slow-down: it drains the queue fast once it has joined
            runner.add_replica(["cpu"], env={"EVALFLEET_TEST_FAULT": ""}, threads=1)
        except BaseException as error:
            errors.append(error)

    adder = threading.Thread(target=add)
    told: list[int] = []
    runner.on_new_pids = told.extend  # the monitor's hook: it watches the new replica's processes too
    try:
        results = run_all(AfterFirstBatch(runner, adder.start), batches)
        adder.join()
        description = runner.describe()
        names = runner.replica_names
        new_pids = runner.worker_pids()[1]
    finally:
        runner.close()
    assert not errors, errors
    assert told == new_pids and told
    problems = differences(reference, results, *TOLERANCE)
    assert not problems, "\n".join(problems[:10])
    assert names == ["replica-0", "replica-1"] and description["replicas_at_end"] == 2 and description["dp"] == 1
    per_replica = description["batches_per_replica"]
    assert per_replica["replica-1"] >= 1, per_replica
    assert sum(per_replica.values()) == len(batches)
    (change,) = description["replica_changes"]
    assert {key: change[key] for key in ("change", "replica", "devices")} == {
        "change": "added", "replica": "replica-1", "devices": ["cpu"]
    }
    assert change["at_s"] > 0


def test_a_retired_replica_finishes_its_batch_stops_and_the_run_completes(llama, scored):
    batches, reference = scored
    runner = start_runner(llama, dp=2, fault="slow_batch:0.5")
    leaving_pids = runner.worker_pids()[1]
    alive_when_left: list[list[int]] = []
    refusals: list[str] = []

    def retire() -> None:
        runner.retire_replica("replica-1", on_left=lambda: alive_when_left.append(alive(leaving_pids)))
        for name in ("replica-1", "replica-7"):  # already leaving; unknown
            with pytest.raises(EvalfleetError) as refused:
                runner.retire_replica(name)
            refusals.append(str(refused.value))

    try:
        results = run_all(AfterFirstBatch(runner, retire), batches)
        description = runner.describe()
        names = runner.replica_names
        with pytest.raises(EvalfleetError, match="last live replica"):
            runner.retire_replica("replica-0")
    finally:
        runner.close()
    with pytest.raises(EvalfleetError, match="closed"):
        runner.add_replica(["cpu"])
    problems = differences(reference, results, *TOLERANCE)
    assert not problems, "\n".join(problems[:10])
    assert alive_when_left == [[]], "on_left must come once, after the replica's workers are gone"
    assert len(leaving_pids) == 1 and not alive(leaving_pids)
    assert "already leaving" in refusals[0] and "no replica named 'replica-7'" in refusals[1]
    assert names == ["replica-0"] and description["replicas_at_end"] == 1
    # The batch in hand when retired counts; no batch after it (at most one more taken before the retirement).
    per_replica = description["batches_per_replica"]
    assert 1 <= per_replica["replica-1"] <= 2 and sum(per_replica.values()) == len(batches), per_replica
    assert [(c["change"], c["replica"]) for c in description["replica_changes"]] == [("retired", "replica-1")]
