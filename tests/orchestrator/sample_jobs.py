"""Small builders shared by the orchestrator tests."""

from __future__ import annotations

from evalfleet.orchestrator.demand import JobDemand
from evalfleet.orchestrator.policy import QueuedJob


def demand(
    model: str = "m",
    *,
    tp: int = 1,
    pp: int = 1,
    replicas: int = 1,
    min_replicas: int = 1,
    seconds: float = 100.0,
    startup: float = 0.0,
) -> JobDemand:
    """A job whose work takes `seconds` on one replica; k replicas go k times as fast."""
    rate = 1000.0
    return JobDemand(
        model=model, work_tokens=seconds * rate, tokens_per_s=tuple(rate * k for k in range(1, replicas + 1)),
        tp=tp, pp=pp, min_replicas=min_replicas, startup_s=startup, warm_startup_s=startup / 2,
    )


def queued(job_id: str, priority: str = "normal", submitted: float = 0.0, **kwargs) -> QueuedJob:
    not_before = kwargs.pop("not_before", 0.0)
    return QueuedJob(job_id, demand(**kwargs), priority, submitted, not_before)
