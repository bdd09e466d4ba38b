"""The orchestrator: a job store, a pure scheduling policy, executors and workers, fault recovery, a simulator."""

from evalfleet.orchestrator.demand import JobDemand, slot_inventory
from evalfleet.orchestrator.executors import Executor, Exited, Handle, LocalExecutor, Running, SubprocessExecutor
from evalfleet.orchestrator.policy import (
    AllocationPlan,
    PolicyOptions,
    QueuedJob,
    Reservation,
    RunningJob,
    Start,
    create_allocation_plan,
)
from evalfleet.orchestrator.recovery import RecoveryDecision, RecoveryOptions
from evalfleet.orchestrator.scheduler import DistributedEvaluationOrchestrator, TaskProgress
from evalfleet.orchestrator.states import TRANSITIONS, IllegalTransition, JobState
from evalfleet.orchestrator.store import JobRecord, JobStore, resolve_db_path

__all__ = [
    "TRANSITIONS",
    "AllocationPlan",
    "DistributedEvaluationOrchestrator",
    "Executor",
    "Exited",
    "Handle",
    "IllegalTransition",
    "JobDemand",
    "JobRecord",
    "JobState",
    "JobStore",
    "LocalExecutor",
    "PolicyOptions",
    "QueuedJob",
    "RecoveryDecision",
    "RecoveryOptions",
    "Reservation",
    "Running",
    "RunningJob",
    "Start",
    "SubprocessExecutor",
    "TaskProgress",
    "create_allocation_plan",
    "resolve_db_path",
    "slot_inventory",
]
