"""What happens after a job fails: retry later, give up, or stop trusting a GPU.

The failure's class (see `failures.py`) decides: only infrastructure failures are retried. The
first failure of a streak retries at once, on other devices where there are some (a killed
worker on healthy GPUs, a lost node or a stall needs no waiting); an attempt that fails again
without computing anything extends the streak, and the streak backs off exponentially, so a
job that crashes at start does not hammer the pool. An attempt that computed something ends
the streak: the next failure is a first one again. A GPU is
quarantined only on device evidence: the GPU reported Xid or uncorrected ECC errors when a
job failed on it, or jobs of `quarantine_after` different models failed on it recently (one
model failing again and again says more about the model than the GPU). The evidence is kept
with the quarantine until an operator releases the device (`evalfleet release`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from evalfleet.orchestrator.demand import Device
from evalfleet.orchestrator.failures import DeviceEvidence, FailureClass
from evalfleet.orchestrator.states import JobState
from evalfleet.orchestrator.store import JobStore


@dataclass(frozen=True)
class RecoveryOptions:
    max_attempts: int = 3
    backoff_base_s: float = 30.0
    backoff_max_s: float = 1800.0
    quarantine_after: int = 3
    """Distinct models whose jobs must fail on one GPU within `quarantine_window_s` before it is quarantined."""
    quarantine_window_s: float = 3600.0


@dataclass(frozen=True)
class RecoveryDecision:
    job_id: str
    action: str
    """"requeued", "failed", or "ignored" (the job was not in a state a failure can apply to)."""
    attempts: int
    retry_at: float | None = None
    quarantined: tuple[Device, ...] = ()
    failure: FailureClass = FailureClass.INFRASTRUCTURE


def backoff_seconds(streak: int, options: RecoveryOptions) -> float:
    """Delay after the `streak`-th failure in a row without progress (1-based): none after the
    first, then base, 2 x base, 4 x base, ... capped."""
    if streak <= 1:
        return 0.0
    return min(options.backoff_base_s * 2 ** (streak - 2), options.backoff_max_s)


def next_streak(streak: int, progressed: bool) -> int:
    """The failure streak after one more failed attempt: 1 if that attempt computed something (it was
    no crash loop), else one longer."""
    return 1 if progressed else streak + 1


def retry_delay(failures: int, failure: FailureClass, options: RecoveryOptions, *, streak: int,
                backoff: bool = True) -> float | None:
    """Seconds to wait before the next attempt after `failures` failed ones, or None: give up.

    Only infrastructure failures are retried, up to `max_attempts` in all. The wait grows with
    `streak`, the failures in a row without progress; the first retries at once. `backoff=False`
    (a lost node) always retries at once. The scheduler (`recover`) and `run --ray` decide alike.
    """
    if not failure.retried or failures >= options.max_attempts:
        return None
    return backoff_seconds(streak, options) if backoff else 0.0


_RECOVERABLE = (JobState.PLACED, JobState.RUNNING)
_NO_RETRY = {
    FailureClass.REQUEST: "the request itself is wrong",
    FailureClass.DETERMINISTIC: "a retry would fail the same way",
    FailureClass.RESOURCE: "it does not fit at the smallest budget and the largest layout available",
}


def recover(
    store: JobStore,
    job_id: str,
    reason: str,
    now: float,
    options: RecoveryOptions,
    *,
    failure: FailureClass = FailureClass.INFRASTRUCTURE,
    evidence: Sequence[DeviceEvidence] = (),
    blame_devices: bool = True,
    backoff: bool = True,
) -> RecoveryDecision:
    """Record a failed attempt of `job_id`; requeue it with backoff or fail it for good.

    `blame_devices=False` is for infrastructure failures that say nothing about the job's
    devices (the scheduler itself died, the launch failed, a node was lost), so they never
    count towards quarantine; failures of the other classes never do. `backoff=False`
    retries at once (a lost node: the job was not at fault and the other nodes are ready).
    A requeued job remembers the devices it failed on (`avoid`): the policy places it
    elsewhere where the pool has room, and on them only where it has none.
    """
    record = store.get(job_id)
    if record.state not in _RECOVERABLE:
        return RecoveryDecision(job_id, "ignored", record.attempts, failure=failure)
    failures = record.attempts + 1
    quarantined: tuple[Device, ...] = ()
    if failure is FailureClass.INFRASTRUCTURE:
        model = str((record.request.get("model") or {}).get("path", "")) or None
        quarantined = _blame(store, job_id, record.placement or [], model, reason, evidence, now, options,
                             count_failure=blame_devices)
    common = {"attempts": failures, "error": reason, "pid": None, "handle": None, "placement": None}
    streak = next_streak(record.failure_streak, progressed=record.progress_at is not None)
    delay = retry_delay(failures, failure, options, streak=streak, backoff=backoff)
    if delay is not None:
        store.transition(
            job_id, JobState.QUEUED, now=now, not_before=now + delay, failure_streak=streak,
            avoid=list(record.placement or ()),
            reason=f"attempt {failures} of {options.max_attempts} failed ({reason}); retry in {delay:.0f}s",
            **common,
        )
        return RecoveryDecision(job_id, "requeued", failures, now + delay, quarantined, failure)
    why = _NO_RETRY.get(failure, "no attempts left")
    store.transition(
        job_id, JobState.FAILED, now=now,
        reason=f"attempt {failures} of {options.max_attempts} failed, {failure.value} ({reason}); {why}", **common,
    )
    return RecoveryDecision(job_id, "failed", failures, None, quarantined, failure)


def _blame(
    store: JobStore,
    job_id: str,
    placement: Sequence[Device],
    model: str | None,
    reason: str,
    evidence: Sequence[DeviceEvidence],
    now: float,
    options: RecoveryOptions,
    *,
    count_failure: bool,
) -> tuple[Device, ...]:
    """Quarantine the devices the evidence points at; return those newly quarantined."""
    already = store.quarantined()
    reported = {tuple(item.device): item.findings for item in evidence}
    quarantined: list[Device] = []
    for device in placement:
        device = tuple(device)
        findings = reported.get(device)
        if findings:
            if device not in already:
                store.quarantine(device, f"GPU {device[1]} of node {device[0]} reported {', '.join(findings)} "
                                         f"when job {job_id} failed ({reason})", now=now, evidence=findings)
                quarantined.append(device)
            continue
        if not count_failure:
            continue
        since = now - options.quarantine_window_s
        models = store.record_device_failure(device, job_id, reason, since=since, now=now, model=model)
        if models >= options.quarantine_after and device not in already:
            history = [f"{f['model'] or f['job_id']}: {f['reason']}" for f in store.device_failures(device, since=since)]
            store.quarantine(
                device,
                f"jobs of {models} different models failed on GPU {device[1]} of node {device[0]} within "
                f"{options.quarantine_window_s:.0f}s (last: {reason})",
                now=now, evidence=history,
            )
            quarantined.append(device)
    return tuple(quarantined)
