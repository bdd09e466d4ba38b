"""Why an attempt failed, decided where the failure is known, and what the scheduler does about it.

| class          | example                                              | retry | blames devices        |
| -------------- | ---------------------------------------------------- | ----- | --------------------- |
| request        | bad input, an unknown task                           | no    | never                 |
| deterministic  | no tp plan, a dataset offline, a poison batch        | no    | never                 |
| resource       | out of memory at the smallest budget, largest layout | no    | never                 |
| infrastructure | killed by a signal, lost heartbeat, collective lost  | yes   | only on evidence      |
| (storage)      | the store locked past its busy timeout, a full disk  | yes   | never                 |

Storage faults are infrastructure that no device caused: the store or a disk failed under
the job, and a later attempt resumes from the request cache once it recovers.

Out of memory is retried where it happens (the runners halve their token budget, the
distributed loader tries the next larger layout), so a `resource` failure that reaches the
scheduler has used both up; a retry on the same devices would fail the same way.

Device evidence is what the GPU itself reports (NVML Xid events, uncorrected ECC errors),
read by the worker when it fails, or failures of several different models on one device. It
turns any failure into infrastructure, except a poison batch (`runtime.workers.PoisonBatch`):
one batch that crashed replicas on two different devices explains what those devices report,
so it stays deterministic and blames none of them.
"""

from __future__ import annotations

import enum
import errno
import sqlite3
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from evalfleet.orchestrator.demand import Device
from evalfleet.types import EvalfleetError, InfrastructureError


class FailureClass(str, enum.Enum):
    REQUEST = "request"
    DETERMINISTIC = "deterministic"
    RESOURCE = "resource"
    INFRASTRUCTURE = "infrastructure"

    @property
    def retried(self) -> bool:
        return self is FailureClass.INFRASTRUCTURE


class DeviceEvidence(BaseModel):
    """What one device reported about itself when an attempt on it failed."""

    device: tuple[int, int]
    findings: list[str] = Field(description="e.g. 'Xid 79 (2 events)', '3 uncorrected ECC errors'")


class ExitReport(BaseModel):
    """A worker's account of its failed attempt, written to the store before it exits."""

    failure: FailureClass
    reason: str
    evidence: list[DeviceEvidence] = Field(default_factory=list)
    blame_devices: bool = Field(True, description="False when the failure says nothing about the job's "
                                                  "devices (the store or a disk failed)")


class StorageFault(InfrastructureError):
    """The job store or a disk failed under the job, so even the exit report may be unwritten: the
    exit code alone tells the scheduler to retry with backoff and blame no device."""

    exit_code = 74  # EX_IOERR


_INFRASTRUCTURE_TYPES = ("DistBackendError", "DistNetworkError", "DistStoreError")
_DEVICE_MESSAGES = ("CUDA error", "NCCL error", "ECC error", "CUBLAS_STATUS_EXECUTION_FAILED")
_SQLITE_STORAGE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_PROTOCOL")
_SQLITE_STORAGE_MESSAGES = ("database is locked", "database table is locked", "disk is full", "disk I/O error",
                            "unable to open database file")
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ESTALE})


def storage_fault(error: BaseException | None) -> bool:
    """Whether `error` (or what caused it) is a store or disk failing: locked, full, or an I/O error."""
    while error is not None:
        if isinstance(error, StorageFault):
            return True
        if isinstance(error, sqlite3.DatabaseError):
            name = getattr(error, "sqlite_errorname", "")  # Python 3.11+
            if name.startswith(_SQLITE_STORAGE) or any(text in str(error) for text in _SQLITE_STORAGE_MESSAGES):
                return True
        elif isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
            return True
        error = error.__cause__
    return False


def classify(error: BaseException) -> FailureClass:
    """The failure class of an exception raised while running a job."""
    if storage_fault(error):
        return FailureClass.INFRASTRUCTURE
    if isinstance(error, EvalfleetError):
        return FailureClass(error.failure)
    if type(error).__name__ == "OutOfMemoryError" or isinstance(error, MemoryError):
        return FailureClass.RESOURCE
    if type(error).__name__ in _INFRASTRUCTURE_TYPES or isinstance(error, TimeoutError):
        return FailureClass.INFRASTRUCTURE
    if any(text in str(error) for text in _DEVICE_MESSAGES):
        return FailureClass.INFRASTRUCTURE
    return FailureClass.DETERMINISTIC  # a bug fails the same way on any device


def exit_report(error: BaseException, reason: str, evidence: list[DeviceEvidence]) -> ExitReport:
    """The report of a failed attempt: a device that reports faults makes it infrastructure, whatever the error,
    unless a poison batch explains it; a storage fault blames no device without such evidence."""
    from evalfleet.runtime.workers import PoisonBatch  # imported only when an attempt has failed

    if isinstance(error, PoisonBatch):
        return ExitReport(failure=classify(error), reason=reason, evidence=evidence, blame_devices=False)
    failure = FailureClass.INFRASTRUCTURE if evidence else classify(error)
    return ExitReport(failure=failure, reason=reason, evidence=evidence, blame_devices=not storage_fault(error))


class DeviceWatch:
    """Reads the job's GPUs through NVML from the start of an attempt, so Xid events are caught.

    `nvml` is injectable (tests pass a fake); without NVML or without GPUs it finds nothing.
    """

    def __init__(self, placement: Sequence[Device], nvml: Any = None) -> None:
        from evalfleet.monitoring.nvml import NvmlCollector

        self.placement = [tuple(device) for device in placement]
        self.collector = NvmlCollector(nvml=nvml) if self.placement else None
        self._ecc_before = self._ecc() if self.collector is not None and self.collector.available else {}

    def _ecc(self) -> dict[int, int]:
        return {metrics.index: metrics.ecc_uncorrected or 0 for metrics in self.collector.collect()}

    def evidence(self) -> list[DeviceEvidence]:
        if self.collector is None or not self.collector.available:
            return []
        by_index = {metrics.index: metrics for metrics in self.collector.collect()}
        found = []
        for node, gpu in self.placement:
            metrics = by_index.get(gpu)
            if metrics is None:
                continue
            findings = []
            if metrics.xid_errors:
                findings.append(f"Xid {metrics.last_xid} ({metrics.xid_errors} event{'s' * (metrics.xid_errors > 1)})")
            new_ecc = (metrics.ecc_uncorrected or 0) - self._ecc_before.get(gpu, 0)
            if new_ecc > 0:
                findings.append(f"{new_ecc} uncorrected ECC error{'s' * (new_ecc > 1)}")
            if findings:
                found.append(DeviceEvidence(device=(node, gpu), findings=findings))
        return found

    def close(self) -> None:
        if self.collector is not None:
            self.collector.close()
