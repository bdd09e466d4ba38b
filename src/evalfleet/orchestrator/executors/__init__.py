"""Executors: how a placed job becomes running processes (one implementation per mechanism)."""

from evalfleet.orchestrator.executors.base import RUNNING, Executor, Exited, Handle, Running, Status
from evalfleet.orchestrator.executors.local import LocalExecutor
from evalfleet.orchestrator.executors.process import SubprocessExecutor
from evalfleet.orchestrator.executors.ray import RayExecutor

__all__ = ["RUNNING", "Executor", "Exited", "Handle", "LocalExecutor", "RayExecutor", "Running", "Status", "SubprocessExecutor"]
