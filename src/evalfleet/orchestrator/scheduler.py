"""`DistributedEvaluationOrchestrator`: the queue, the scheduling loop and fault recovery.

The store is the source of truth, so the CLI (submit, cancel, status) is a thin client
that never needs the running scheduler: a `cancel` from another process only marks the
job, and the loop that owns the process stops it on its next round. Decisions come from
the pure `policy.create_allocation_plan`; launching goes through an `Executor`. Workers
of a self-reporting executor (`LocalExecutor`) confirm their own start, heartbeat and
record their own result; the loop then only settles processes that died without one.

A worker that heartbeats but whose requests stop moving (a hung batch, a deadlocked main
thread under a live heartbeat thread) is *stalled*: it is stopped as a silent one is and
retried as an infrastructure failure that blames no device. Its bound (`StallBounds`) comes
from its own measured speed: `batch_factor` (10) times the slowest batch this attempt
measured for the kind of request now running (the longest gap between two moves of its
computed requests, which the worker writes as `slowest_batch_s`), at least `floor_s` (300 s).
Once every request it has reached is done (lm-eval scoring, or building the next kind of
requests: work of the main thread that moves no request), the bound is `load_floor_s`. Until a batch has been measured
(loading, the first batch of a kind, since a generation batch may take a hundred times a
log-likelihood one, or requests that all came from the cache) the load bound applies instead:
`load_factor` (3) times the planner's start-up estimate for the job (`JobDemand.startup_s`),
at least `load_floor_s` (1800 s: imports, task building, a large model read from a slow disk
or fetched from the hub take minutes, and it is the Ray ranks' own bound on a load,
`RayGroupRunner`'s `load_timeout`, so a stall never cuts a load Ray would still wait for).
Both are measured from the last move (`progress_at`), else from the worker's start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from signal import Signals
from typing import Any

from pydantic import ValidationError

from evalfleet.orchestrator.demand import Device, JobDemand, size_request
from evalfleet.orchestrator.executors.base import Executor, Exited, Handle
from evalfleet.orchestrator.policy import (
    AllocationPlan,
    PolicyOptions,
    QueuedJob,
    RunningJob,
    Start,
    create_allocation_plan,
)
from evalfleet.orchestrator.failures import DeviceEvidence, ExitReport, FailureClass, StorageFault
from evalfleet.orchestrator.pool import record_pool
from evalfleet.orchestrator.recovery import RecoveryDecision, RecoveryOptions, recover
from evalfleet.orchestrator.rounds import run_rounds
from evalfleet.orchestrator.states import JobState
from evalfleet.orchestrator.store import JobRecord, JobStore, Resize
from evalfleet.planning import Inventory
from evalfleet.types import EvalfleetError, EvaluationRequest, NodeLost, UsageError, describe_validation_error

_ACTIVE = (JobState.PLACED, JobState.RUNNING)
SELF_REPORTING_HEARTBEAT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class StallBounds:
    """How long a running job's computed requests may stand still before it is declared stalled
    (the module's docstring says where the numbers come from)."""

    floor_s: float = 300.0
    batch_factor: float = 10.0
    load_floor_s: float = 1800.0
    load_factor: float = 3.0

    def bound(self, record: JobRecord) -> tuple[float, str]:
        """Seconds without a move that mean a stall, and what the bound rests on."""
        finished = bool(record.total) and record.done >= record.total  # scoring, or building the next kind
        if record.slowest_batch_s is not None and not finished:
            bound = max(self.floor_s, self.batch_factor * record.slowest_batch_s)
            return bound, f"{self.batch_factor:g} x its slowest batch of {record.slowest_batch_s:.1f}s, at least " \
                          f"{self.floor_s:.0f}s"
        startup = JobDemand.from_dict(record.demand).startup_s if record.demand else 0.0
        bound = max(self.load_floor_s, self.load_factor * startup)
        state = "every request it reached is done" if finished else "no batch measured yet"
        return bound, f"{state}: {self.load_factor:g} x its start-up estimate of {startup:.0f}s, " \
                      f"at least {self.load_floor_s:.0f}s"

    def stalled(self, record: JobRecord, now: float) -> str | None:
        """Why `record` counts as stalled at `now`, or None while it moves (or has not started)."""
        if record.state is not JobState.RUNNING:
            return None
        since = record.progress_at or record.started_at
        if since is None:
            return None
        bound, basis = self.bound(record)
        if now - since <= bound:
            return None
        what = "no request computed" if record.progress_at is not None else "no batch done since it started"
        return f"stalled: {what} for {now - since:.0f}s (bound {bound:.0f}s: {basis})"


@dataclass(frozen=True)
class TaskProgress:
    job_id: str
    state: JobState
    priority: str
    attempt: int
    done: int
    total: int | None
    tokens_per_s: float | None
    eta_s: float | None
    devices: tuple[Device, ...]


class DistributedEvaluationOrchestrator:
    """Schedules evaluation jobs over a GPU (or CPU slot) pool and keeps them alive."""

    def __init__(
        self,
        store: JobStore | str | os.PathLike[str],
        inventory: Inventory,
        executor: Executor | None = None,
        *,
        policy: PolicyOptions = PolicyOptions(),
        recovery: RecoveryOptions = RecoveryOptions(),
        heartbeat_timeout_s: float | None = None,
        stall: StallBounds | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store if isinstance(store, JobStore) else JobStore(Path(store))
        self.inventory = inventory
        self.executor = executor
        self.policy = policy
        self.recovery = recovery
        if heartbeat_timeout_s is None and executor is not None and executor.self_reporting:
            heartbeat_timeout_s = SELF_REPORTING_HEARTBEAT_TIMEOUT_S  # its workers heartbeat, so silence means trouble
        self.heartbeat_timeout_s = heartbeat_timeout_s
        if stall is None and executor is not None and executor.self_reporting:
            stall = StallBounds()  # only its workers write how far they got
        self.stall = stall
        self.clock = clock
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        # Jobs whose processes this scheduler watches, and stopped ones whose processes have
        # not exited yet (their GPUs stay busy until they do), each with its devices.
        self._live: dict[str, tuple[Handle, tuple[Device, ...]]] = {}
        self._draining: dict[str, tuple[Handle, tuple[Device, ...]]] = {}
        self._warm: dict[Device, str] = {}

    # the queue ------------------------------------------------------------------------------

    def submit_evaluation_request(self, request: EvaluationRequest | Mapping[str, Any], *,
                                  group_id: str | None = None) -> str:
        """Validate, size against the whole pool, and queue (in `group_id`'s group); refuse a job that
        can never fit."""
        if not isinstance(request, EvaluationRequest):
            try:
                request = EvaluationRequest.model_validate(request)
            except ValidationError as error:
                raise UsageError(describe_validation_error(error)) from None
        plan, demand, size = size_request(request, self.inventory)
        return self.store.add(
            request.model_dump(mode="json"),
            priority=request.priority,
            max_attempts=self.recovery.max_attempts,
            demand=demand.to_dict(),
            plan=plan,
            size=size,
            now=self.clock(),
            group_id=group_id,
        )

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job; a running one is stopped by whichever scheduler owns its process."""
        record = self.store.get(job_id)
        if record.state.terminal:
            raise UsageError(f"job {job_id} already {record.state.value}")
        record = self.store.transition(job_id, JobState.CANCELLED, reason="cancelled by user", now=self.clock())
        self._stop(job_id)
        return record

    def status(self, job_id: str) -> JobRecord:
        return self.store.get(job_id)

    def list(self, states: Iterable[JobState] | None = None) -> list[JobRecord]:
        return self.store.list(states)

    # decisions ------------------------------------------------------------------------------

    def create_allocation_plan(self, now: float | None = None) -> AllocationPlan:
        """What the policy would start and preempt now, given the store's queue and running jobs."""
        now = self.clock() if now is None else now
        queue, running = [], []
        for record in self.store.list([JobState.QUEUED, *_ACTIVE]):
            if record.demand is None:  # not added through submit_evaluation_request: never sized
                continue
            demand = _remaining(record)
            if record.state is JobState.QUEUED:
                demand = replace(demand, avoid=tuple(record.avoid or ()))
                queue.append(QueuedJob(record.id, demand, record.priority, record.submitted_at, record.not_before))
            elif record.placement:
                running.append(self._running_view(record, demand, now))
        running += [RunningJob(job_id, devices, now, "high", False)
                    for job_id, (_, devices) in self._draining.items() if devices]
        return create_allocation_plan(
            queue, self.inventory, running, now,
            options=self.policy, quarantined=self.store.quarantined(), warm=self._warm,
        )

    def _running_view(self, record: JobRecord, demand: JobDemand, now: float) -> RunningJob:
        """A placed or running job as the policy sees it, its remaining work at its measured speed."""
        resize = Resize.load(record.resize, record.placement or ()) if record.resize is not None else None
        leaving = () if resize is None else tuple(d for devices in (*resize.leaving, *resize.shrink) for d in devices)
        view = RunningJob(
            record.id, tuple(record.placement or ()), self._expected_end(record, demand, now), record.priority,
            preemptible=record.state is JobState.RUNNING, demand=demand,
            # not while a replica it grew by is still loading: one change at a time
            resizable=resize is not None and self.executor is not None and not (resize.joining or resize.grow),
            leaving=leaving,
            load_s=resize.load_s if resize is not None else None,
        )
        return replace(view, demand=_at_measured_speed(record, demand, max(1, view.replicas)))

    def monitor_running_tasks(self) -> list[TaskProgress]:
        """Per placed or running job: requests done of total, tokens/s, ETA and current attempt."""
        now = self.clock()
        report = []
        for record in self.store.list(_ACTIVE):
            eta = None
            if record.state is JobState.RUNNING and record.demand is not None:
                demand = _remaining(record)
                eta = max(0.0, self._expected_end(record, demand, now) - now)
            report.append(TaskProgress(
                record.id, record.state, record.priority, record.attempts + 1, record.done, record.total,
                record.tokens_per_s, eta, tuple(record.placement or ()),
            ))
        return report

    def _expected_end(self, record: JobRecord, demand: JobDemand, now: float) -> float:
        if record.requests_per_s and record.total:  # measured by the worker: the best guess
            return now + max(0, record.total - record.done) / record.requests_per_s
        if record.tokens_per_s and record.total:
            return now + demand.work_tokens / record.tokens_per_s
        replicas = max(1, len(record.placement or ()) // demand.replica_gpus)
        replicas = min(replicas, demand.max_replicas)
        return (record.started_at or now) + demand.runtime(replicas)

    # faults ---------------------------------------------------------------------------------

    def handle_fault_recovery(self, job_id: str, reason: str, *, failure: FailureClass = FailureClass.INFRASTRUCTURE,
                              evidence: tuple[DeviceEvidence, ...] = (), blame_devices: bool = True,
                              backoff: bool = True) -> RecoveryDecision:
        """Requeue a job that failed for infrastructure reasons with exponential backoff (at once for a
        lost node), or fail it (at once for request, deterministic and resource failures, which a
        retry would repeat).

        GPUs are quarantined only on device evidence; the history is in the store's events.
        """
        self._stop(job_id)
        return recover(self.store, job_id, reason, self.clock(), self.recovery, failure=failure,
                       evidence=evidence, blame_devices=blame_devices, backoff=backoff)

    def reconcile(self) -> list[str]:
        """After a restart, or a round that failed half-way: adopt live jobs of this host that no
        scheduler here watches, and requeue those whose process is gone."""
        host = self.owner.split(":")[0]
        requeued = []
        for record in self.store.list(_ACTIVE):
            watched = record.id in self._live or record.id in self._draining
            if watched or (record.owner and record.owner.split(":")[0] != host):
                continue
            handle = self.executor.reattach(record) if self.executor is not None else None
            if handle is not None:
                self._live[record.id] = (handle, tuple(record.placement or ()))
                continue
            if record.state is JobState.PLACED:
                self.store.transition(record.id, JobState.QUEUED, reason="launch unconfirmed before a restart",
                                      placement=None, now=self.clock())
            else:
                recover(self.store, record.id, "its process was gone when the scheduler restarted",
                        self.clock(), self.recovery, blame_devices=False)
            requeued.append(record.id)
        return requeued

    # the loop -------------------------------------------------------------------------------

    async def run_once(self) -> AllocationPlan:
        """One round: collect exits and stop what was cancelled, re-read the pool (so a job lost with
        its node is placed again, with the others, on live nodes only), then start what the policy says."""
        if self.executor is None:
            raise EvalfleetError("the orchestrator has no executor, so it can plan but not run jobs")
        self._poll()
        self._follow_pool()
        plan = self.create_allocation_plan()
        for job_id in plan.preempt:
            self._preempt(job_id)
        for start in plan.starts:
            self._launch(start)
        self._resize(plan)
        return plan

    async def run_forever(self, interval_s: float = 2.0, stop: asyncio.Event | None = None) -> None:
        """Rounds every `interval_s` until `stop` is set; a round that fails is logged and the loop goes on."""
        await run_rounds(self, interval_s, stop or asyncio.Event())

    def _follow_pool(self) -> None:
        """Take the executor's pool as it is now (nodes lost or joined), and tell `submit` of it."""
        pool = self.executor.current_pool()
        if pool is not None and pool != self.inventory:
            self.inventory = pool
            record_pool(self.store, pool, max_attempts=self.recovery.max_attempts)

    def _poll(self) -> None:
        now = self.clock()
        for job_id, (handle, _) in list(self._draining.items()):
            if isinstance(self.executor.poll(handle), Exited):
                del self._draining[job_id]
                if self.store.get(job_id).state is JobState.PREEMPTED:
                    self.store.transition(job_id, JobState.QUEUED, reason="resuming from the request cache",
                                          placement=None, pid=None, handle=None, now=now)
        for job_id, (handle, _) in list(self._live.items()):
            record = self.store.get(job_id)
            if record.state not in _ACTIVE:
                # Changed by another process: a worker that reported its own end exits by
                # itself; anything else (cancel, requeue) means its process must stop.
                self._stop(job_id, signal=record.state not in (JobState.SUCCEEDED, JobState.FAILED))
                continue
            self._live[job_id] = (handle, tuple(record.placement or ()))  # replicas may have joined or left
            status = self.executor.poll(handle)
            if isinstance(status, Exited):
                del self._live[job_id]
                self._exited(job_id, status.code, now)
                continue
            last = record.heartbeat_at or record.started_at or now
            if self.heartbeat_timeout_s is not None and now - last > self.heartbeat_timeout_s:
                self.handle_fault_recovery(job_id, f"no heartbeat for {now - last:.0f}s")
            elif self.stall is not None and (stalled := self.stall.stalled(record, now)):
                self.handle_fault_recovery(job_id, stalled, blame_devices=False)

    def _exited(self, job_id: str, code: int | None, now: float) -> None:
        """Settle a job whose process ended; a self-reporting worker may have settled it already."""
        record = self.store.get(job_id)
        if record.state.terminal:
            return
        if code == 0 and not self.executor.self_reporting:
            with contextlib.suppress(EvalfleetError):  # moved by another process meanwhile
                self.store.transition(job_id, JobState.SUCCEEDED, expect=JobState.RUNNING,
                                      reason="exited with code 0", now=now)
            return
        report = ExitReport.model_validate(record.failure) if record.failure and code != 0 else None
        if code == 0:
            reason = "exited with code 0 without reporting a result"
        elif report is not None:  # the worker's own account of this attempt (cleared at each launch)
            reason = f"{describe_exit(code)}: {report.reason}"
        else:
            reason = describe_exit(code) + (f": {record.error}" if record.error else "")
        if self.executor.self_reporting and code == NodeLost.exit_code:
            # A machine went away: resume on the nodes that remain at once, and blame no device.
            self.handle_fault_recovery(job_id, reason, blame_devices=False, backoff=False)
        elif self.executor.self_reporting and code == StorageFault.exit_code:  # its report may be unwritten
            self.handle_fault_recovery(job_id, reason, blame_devices=False)
        elif report is not None:
            self.handle_fault_recovery(job_id, reason, failure=report.failure, evidence=tuple(report.evidence),
                                       blame_devices=report.blame_devices)
        elif self.executor.self_reporting and code == UsageError.exit_code:
            self.handle_fault_recovery(job_id, reason, failure=FailureClass.REQUEST)
        else:  # killed, or died without a report: nothing says the request is at fault
            self.handle_fault_recovery(job_id, reason)

    def shutdown(self, wait_s: float = 30.0) -> list[str]:
        """Stop every process this scheduler runs and requeue their jobs, without counting an attempt.

        Workers commit each finished request to the cache, so the next scheduler resumes them.
        """
        stopping = sorted({*self._live, *self._draining})
        for job_id in list(self._live):
            self._stop(job_id)
        deadline = time.monotonic() + wait_s
        while self._draining and time.monotonic() < deadline:
            for job_id, (handle, _) in list(self._draining.items()):
                if isinstance(self.executor.poll(handle), Exited):
                    del self._draining[job_id]
            time.sleep(0.05)
        requeued = []
        for job_id in stopping:  # a process that outlived the wait stays for the next reconcile
            if job_id in self._draining or self.store.get(job_id).state not in (*_ACTIVE, JobState.PREEMPTED):
                continue
            # Settled by another process meanwhile; or the store is failing, and the next reconcile requeues it.
            with contextlib.suppress(EvalfleetError, sqlite3.Error):
                self.store.transition(job_id, JobState.QUEUED, reason="the scheduler stopped; resumes later",
                                      placement=None, pid=None, handle=None, now=self.clock())
                requeued.append(job_id)
        return requeued

    def _stop(self, job_id: str, *, preempt: bool = False, signal: bool = True) -> None:
        """Stop a live job's process (if this scheduler has it) and drain its GPUs."""
        handle, devices = self._live.pop(job_id, (None, ()))
        if handle is None:
            return
        if signal:
            (self.executor.preempt if preempt else self.executor.cancel)(handle)
        self._draining[job_id] = (handle, devices)

    def _resize(self, plan: AllocationPlan) -> None:
        """Hand the policy's replica orders to the running jobs' workers (through the store)."""
        now = self.clock()
        for order in plan.shrinks:
            with contextlib.suppress(EvalfleetError):  # it ended meanwhile: its devices are free anyway
                self.store.order_shrink(order.job_id, list(order.devices), order.reason, now=now)
        for order in plan.grows:
            with contextlib.suppress(EvalfleetError):
                self.store.order_growth(order.job_id, list(order.devices), self.executor.replica_env(order.devices),
                                        now=now)
                record = self.store.get(order.job_id)
                self._warm.update({device: JobDemand.from_dict(record.demand).model for device in order.devices})

    def _preempt(self, job_id: str) -> None:
        self.store.transition(job_id, JobState.PREEMPTED, reason="preempted by a higher-priority job",
                              now=self.clock())
        if job_id in self._live:
            self._stop(job_id, preempt=True)
        else:  # its process belongs to another scheduler, which stops it on seeing the state
            self.store.transition(job_id, JobState.QUEUED, reason="preempted job had no process here",
                                  placement=None, now=self.clock())

    def _launch(self, start: Start) -> None:
        now = self.clock()
        record = self.store.transition(start.job_id, JobState.PLACED, expect=JobState.QUEUED, now=now,
                                       placement=list(start.devices), owner=self.owner, error=None, failure=None,
                                       progress_at=None, slowest_batch_s=None,
                                       reason=f"{start.replicas} replica(s) on {len(start.devices)} device(s)"
                                       + (" (backfilled)" if start.backfilled else ""))
        try:
            handle = self.executor.launch(record, start.devices)
        except Exception as error:  # e.g. its log folder cannot be made: nothing to do with its devices
            text = str(error) if isinstance(error, EvalfleetError) else f"{type(error).__name__}: {error}"
            self.handle_fault_recovery(start.job_id, f"launch failed: {text}", blame_devices=False)
            return
        self._live[start.job_id] = (handle, tuple(start.devices))
        if self.executor.self_reporting:  # its worker moves it to running once it has started
            if not self.store.attach(start.job_id, pid=handle.pid, handle=handle.data, now=now):
                # A worker launched before a restart confirmed the job first: it keeps it, and the
                # next round's reconcile adopts it.
                del self._live[start.job_id]
                self.executor.cancel(handle)
                raise EvalfleetError(f"job {start.job_id} was taken by a worker started before this scheduler")
        else:
            try:
                self.store.transition(start.job_id, JobState.RUNNING, expect=JobState.PLACED, now=now,
                                      pid=handle.pid, handle=handle.data, started_at=now, heartbeat_at=now,
                                      reason=f"launched by {self.executor.name}")
            except EvalfleetError:  # cancelled between placement and launch
                self._stop(start.job_id)
                return
        self._warm.update({device: JobDemand.from_dict(record.demand).model for device in start.devices})


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited without reporting"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {Signals(-code).name}"
    return f"exited with code {code}"


def _at_measured_speed(record: JobRecord, demand: JobDemand, replicas: int) -> JobDemand:
    """The demand with its speeds scaled so its `replicas` finish when the worker's measured rate says."""
    if not (record.requests_per_s and record.total) or demand.work_tokens <= 0:
        return demand
    measured_s = max(0, record.total - record.done) / record.requests_per_s
    modeled_s = demand.work_tokens / demand.tokens_per_s[min(replicas, demand.max_replicas) - 1]
    if measured_s <= 0:
        return demand
    return replace(demand, tokens_per_s=tuple(rate * modeled_s / measured_s for rate in demand.tokens_per_s))


def _remaining(record: JobRecord) -> JobDemand:
    """The job's demand, less the share of requests already done (they come from the cache)."""
    demand = JobDemand.from_dict(record.demand)
    if record.total:
        return demand.with_work(demand.work_tokens * (1 - record.done / record.total))
    return demand
