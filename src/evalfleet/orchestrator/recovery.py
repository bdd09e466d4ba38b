"""What happens after a job fails: retry later, give up, or stop trusting a GPU.

Retries back off exponentially so a job that crashes at start does not hammer the pool;
a GPU on which several different jobs failed recently is quarantined (the policy then
never places on it) with the reason recorded, until an operator releases it.
"""

from __future__ import annotations

from dataclasses import dataclass

from evalfleet.orchestrator.demand import Device
from evalfleet.orchestrator.states import JobState
from evalfleet.orchestrator.store import JobStore


@dataclass(frozen=True)
class RecoveryOptions:
    max_attempts: int = 3
    backoff_base_s: float = 30.0
    backoff_max_s: float = 1800.0
    quarantine_after: int = 3
    """Distinct jobs that must fail on one GPU within `quarantine_window_s` before it is quarantined."""
    quarantine_window_s: float = 3600.0


@dataclass(frozen=True)
class RecoveryDecision:
    job_id: str
    action: str
    """"requeued", "failed", or "ignored" (the job was not in a state a failure can apply to)."""
    attempts: int
    retry_at: float | None = None
    quarantined: tuple[Device, ...] = ()


def backoff_seconds(failures: int, options: RecoveryOptions) -> float:
    """Delay before retry number `failures` (1-based): base, 2 x base, 4 x base, ... capped."""
    return min(options.backoff_base_s * 2 ** (failures - 1), options.backoff_max_s)


_RECOVERABLE = (JobState.PLACED, JobState.RUNNING)


def recover(
    store: JobStore,
    job_id: str,
    reason: str,
    now: float,
    options: RecoveryOptions,
    *,
    blame_devices: bool = True,
    retry: bool = True,
    backoff: bool = True,
) -> RecoveryDecision:
    """Record a failed attempt of `job_id`; requeue it with backoff or fail it for good.

    `blame_devices=False` is for failures that say nothing about the hardware (the
    scheduler itself died), so they never count towards quarantine; `retry=False` for
    failures no retry can fix (the request itself is wrong); `backoff=False` retries at once
    (a lost node: the job was not at fault and the other nodes are ready).
    """
    record = store.get(job_id)
    if record.state not in _RECOVERABLE:
        return RecoveryDecision(job_id, "ignored", record.attempts)
    failures = record.attempts + 1
    quarantined: list[Device] = []
    if blame_devices:
        already = store.quarantined()
        since = now - options.quarantine_window_s
        for device in record.placement or ():
            count = store.record_device_failure(device, job_id, reason, since=since, now=now)
            if count >= options.quarantine_after and device not in already:
                store.quarantine(
                    device,
                    f"{count} different jobs failed on GPU {device[1]} of node {device[0]} within "
                    f"{options.quarantine_window_s:.0f}s (last: {reason})",
                    now=now,
                )
                quarantined.append(device)
    common = {"attempts": failures, "error": reason, "pid": None, "handle": None, "placement": None}
    if retry and failures < options.max_attempts:
        delay = backoff_seconds(failures, options) if backoff else 0.0
        store.transition(
            job_id, JobState.QUEUED, now=now, not_before=now + delay,
            reason=f"attempt {failures} of {options.max_attempts} failed ({reason}); retry in {delay:.0f}s",
            **common,
        )
        return RecoveryDecision(job_id, "requeued", failures, now + delay, tuple(quarantined))
    store.transition(
        job_id, JobState.FAILED, now=now,
        reason=f"attempt {failures} of {options.max_attempts} failed ({reason}); "
               + ("no attempts left" if retry else "a retry would fail the same way"), **common,
    )
    return RecoveryDecision(job_id, "failed", failures, None, tuple(quarantined))
