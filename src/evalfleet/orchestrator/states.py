"""The job life cycle as data: every legal transition is listed here and nowhere else.

The store refuses anything not in `TRANSITIONS`, so a scheduler bug or a racing CLI call
cannot, say, resurrect a cancelled job or mark a queued job succeeded.
"""

from __future__ import annotations

import enum

from evalfleet.types import EvalfleetError


class JobState(str, enum.Enum):
    QUEUED = "queued"
    PLACED = "placed"
    RUNNING = "running"
    PREEMPTED = "preempted"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # placed: GPUs chosen; the executor has not confirmed the launch yet.
    JobState.QUEUED: frozenset({JobState.PLACED, JobState.CANCELLED}),
    # placed -> queued: the launch failed with attempts left; -> failed: none left.
    JobState.PLACED: frozenset({JobState.RUNNING, JobState.QUEUED, JobState.FAILED, JobState.CANCELLED}),
    # running -> queued: a crash with attempts left, or a restart found its process gone.
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.PREEMPTED, JobState.QUEUED}
    ),
    # preempted jobs resume from the request cache once they are queued again.
    JobState.PREEMPTED: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class IllegalTransition(EvalfleetError):
    """A job was asked to move to a state its current state cannot reach."""

    def __init__(self, job_id: str, current: JobState, target: JobState) -> None:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current])) or "nothing (it is finished)"
        super().__init__(
            f"job {job_id} cannot go from {current.value} to {target.value}; "
            f"from {current.value} it can go to {allowed}"
        )
        self.job_id, self.current, self.target = job_id, current, target


def check_transition(job_id: str, current: JobState, target: JobState) -> None:
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(job_id, current, target)
