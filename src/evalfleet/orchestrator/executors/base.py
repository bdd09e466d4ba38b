"""The one interface the scheduler launches jobs through.

Like vLLM's executors: the scheduler knows only this interface, and each mechanism
(local processes, Ray actors, ...) is one implementation. A handle carries a JSON-able
`data` dict that the store keeps, so a restarted scheduler can `reattach` to jobs its
predecessor launched without knowing how they were launched.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from evalfleet.orchestrator.store import Device, JobRecord
from evalfleet.planning import Inventory


@dataclass(frozen=True)
class Handle:
    job_id: str
    pid: int | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Running:
    pass


@dataclass(frozen=True)
class Exited:
    """The job's process is gone. `code` is None when the executor cannot know it (not its child)."""

    code: int | None


RUNNING = Running()
Status = Running | Exited


class Executor(abc.ABC):
    """Runs one job on the devices the policy gave it."""

    name: str = "executor"
    self_reporting: bool = False
    """True when the job's own process confirms its start, reports progress and records its end."""

    @abc.abstractmethod
    def launch(self, job: JobRecord, placement: Sequence[Device]) -> Handle:
        """Start the job; return at once. Raise `EvalfleetError` if it could not be started."""

    @abc.abstractmethod
    def poll(self, handle: Handle) -> Status: ...

    @abc.abstractmethod
    def cancel(self, handle: Handle) -> None:
        """Stop the job for good; its GPUs are free once `poll` says it exited."""

    def preempt(self, handle: Handle) -> None:
        """Stop the job so it can resume later from the request cache.

        Workers write every finished request to the cache before reporting it, so a plain
        stop loses nothing; mechanisms that can checkpoint more cleverly override this.
        """
        self.cancel(handle)

    @abc.abstractmethod
    def reattach(self, job: JobRecord) -> Handle | None:
        """A handle for a job launched by an earlier scheduler, or None if its process is gone."""

    def replica_env(self, devices: Sequence[Device]) -> dict[str, str]:
        """Variables for one more replica of a running job on `devices` (`EVALFLEET_THREADS`: its
        CPU threads; `CUDA_VISIBLE_DEVICES`: its GPUs), which the job's worker starts itself."""
        return {}

    def close(self) -> None:
        """Release what the executor holds besides its jobs (the scheduler is stopping)."""

    def current_pool(self) -> Inventory | None:
        """The pool as it is now, for mechanisms whose pool changes (a Ray cluster); None if fixed."""
        return None
