"""End to end, for real: a job whose batch hangs while its worker heartbeats is declared stalled.

A scheduler in this process with a `LocalExecutor` (real worker processes, real worker-group
ranks) and stall bounds of seconds. One rank batch never finishes (`hang_batch_once` fault):
the worker's heartbeat thread goes on, its computed requests stand still, the scheduler stops
it, retries it as infrastructure (no device blamed), and the retry's results equal a
fault-free run's.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from faultenv import fault_env
from fleet import wait_for
from samples import compare_samples, load_samples, metric_differences

from evalfleet.orchestrator import DistributedEvaluationOrchestrator, JobState
from evalfleet.orchestrator.executors.local import LocalExecutor
from evalfleet.orchestrator.pool import pool_from_options
from evalfleet.orchestrator.recovery import RecoveryOptions
from evalfleet.orchestrator.scheduler import StallBounds
from evalfleet.types import EvaluationRequest

pytestmark = pytest.mark.slow

# Seconds, not minutes: a batch takes well under a second here. The floor still covers lm-eval's
# scoring after the last batch on a loaded 2-core machine (5 s did not), and the load bound
# leaves it room to start a worker and its rank.
STALLS = StallBounds(floor_s=15.0, batch_factor=5.0, load_floor_s=120.0, load_factor=0.0)


def test_a_hung_batch_is_declared_stalled_and_retried_to_the_results_of_a_fault_free_run(tmp_path, tiny_model,
                                                                                          monkeypatch):
    marker = tmp_path / "hung-once"
    for key, value in fault_env(f"hang_batch_once:4:{marker}").items():  # worker-group ranks only
        monkeypatch.setenv(key, value)
    fields = {"model": {"path": str(tiny_model)}, "tasks": {"names": ["demo_mc"], "limit": 6}, "batch_size": 1,
              "engine": "distributed", "strategy": "single", "log_samples": True}  # one rank in a worker group
    db = tmp_path / "fleet" / "jobs.db"
    pool = pool_from_options(slots=1)
    orchestrator = DistributedEvaluationOrchestrator(
        db, pool, LocalExecutor(db, pool, grace_s=2.0), recovery=RecoveryOptions(max_attempts=2, backoff_base_s=0),
        heartbeat_timeout_s=60.0, stall=STALLS,
    )

    def rounds_until(condition, timeout, what):
        def one_round():
            asyncio.run(orchestrator.run_once())
            assert not orchestrator.list([JobState.FAILED]), [r.error for r in orchestrator.list()]
            return condition()

        return wait_for(one_round, timeout, what, interval=0.2)

    try:
        job = orchestrator.submit_evaluation_request(fields)
        hung = rounds_until(lambda: marker.exists() and orchestrator.status(job), 180, "a batch to hang")
        assert hung.attempts == 0 and hung.state is JobState.RUNNING
        finished = rounds_until(lambda: (r := orchestrator.status(job)).state is JobState.SUCCEEDED and r, 240,
                                "the job to be retried and succeed")
    finally:
        orchestrator.shutdown(wait_s=10.0)
    store = orchestrator.store
    stalled = [e.reason for e in store.events(job) if "stalled" in (e.reason or "")]
    assert len(stalled) == 1 and "no request computed for" in stalled[0], [e.reason for e in store.events(job)]
    assert "x its slowest batch" in stalled[0], stalled[0]  # the batch bound, not the load bound
    assert finished.attempts == 1
    assert store.quarantined() == {} and store.device_failures((0, 0), since=0) == []
    store.close()

    reference = tmp_path / "reference"
    from evalfleet.engines.run import evaluate_request

    expected = evaluate_request(EvaluationRequest.model_validate(
        {**fields, "engine": "lightweight", "use_cache": False, "output_dir": str(reference)}))
    document = json.loads(Path(finished.result_path).read_text())
    assert document["evalfleet"]["cache"]["hits"] > 0  # the retry resumed from what the hung attempt finished
    assert compare_samples(load_samples(reference), load_samples(Path(finished.result_path).parent)) == []
    assert metric_differences(expected.document(), document) == []
