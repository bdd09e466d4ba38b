"""A poison batch reaching the scheduler: failed once, not retried, and no device quarantined, even
when the job's GPUs reported faults as it failed (a batch that crashes kernels on two GPUs makes
both report Xid errors).

Each job runs the real worker (`run_worker`) as a child process of a real scheduler; only its
evaluation (which raises the runner's `PoisonBatch`) and its NVML reading (Xid 43 on every device
of the job) are stand-ins.
"""

from __future__ import annotations

import asyncio
import sys
import time

from evalfleet.orchestrator import (
    DistributedEvaluationOrchestrator,
    JobState,
    RecoveryOptions,
    SubprocessExecutor,
    slot_inventory,
)

WORKER = """
import sys
from evalfleet.orchestrator import worker
from evalfleet.orchestrator.failures import DeviceEvidence
from evalfleet.runtime.backends.base import LoglikelihoodItem
from evalfleet.runtime.workers import PoisonBatch

class FaultyGpus:
    def __init__(self, placement, nvml=None):
        self.placement = [(0, 0), (0, 1)]
    def evidence(self):
        return [DeviceEvidence(device=device, findings=["Xid 43 (1 event)"]) for device in self.placement]
    def close(self):
        pass

def evaluate(*args, **kwargs):
    raise PoisonBatch(4, LoglikelihoodItem((1, 5, 6), (7, 8)), ["replica-0 (GPU 0)", "replica-1 (GPU 1)"])

worker.DeviceWatch, worker._evaluate = FaultyGpus, evaluate
worker.run_worker(sys.argv[1], sys.argv[2])
"""


def test_a_poison_batch_fails_its_job_once_and_quarantines_no_device(tmp_path):
    db = tmp_path / "jobs.db"

    def command(job, placement):
        return [sys.executable, "-c", WORKER, job.id, str(db)]

    # One failure with device evidence would be enough to quarantine, were it counted.
    recovery = RecoveryOptions(max_attempts=3, backoff_base_s=0, quarantine_after=1)
    orchestrator = DistributedEvaluationOrchestrator(
        db, slot_inventory(2, memory_gb=64), SubprocessExecutor(command, log_dir=tmp_path / "logs", grace_s=2.0),
        recovery=recovery,
    )
    jobs = [orchestrator.submit_evaluation_request({"model": {"path": model}, "tasks": {"names": ["demo_mc"]}})
            for model in ("gpt2", "mistralai/Mistral-7B-v0.1")]
    deadline = time.monotonic() + 120
    while not all(orchestrator.status(job).state.terminal for job in jobs):
        states = [orchestrator.status(job).state for job in jobs]
        assert time.monotonic() < deadline, (states, orchestrator.store.quarantined())
        asyncio.run(orchestrator.run_once())
        time.sleep(0.05)
    for job in jobs:
        record = orchestrator.status(job)
        assert (record.state, record.attempts) == (JobState.FAILED, 1), (record.state, record.attempts, record.error)
        assert record.failure["failure"] == "deterministic" and record.failure["blame_devices"] is False
        assert record.failure["evidence"], "the devices' own reports are kept with the failure"
        assert "deterministic" in orchestrator.store.events(job)[-1].reason
        assert "batch 4 crashed replica-0 (GPU 0) and replica-1 (GPU 1) on different devices" in record.error
    assert orchestrator.store.quarantined() == {}
    assert orchestrator.store.device_failures((0, 0), since=0) == []
    assert orchestrator.store.device_failures((0, 1), since=0) == []
    orchestrator.store.close()
