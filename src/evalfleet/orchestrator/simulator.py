"""A discrete-event simulator that drives a scheduling policy with a simulated clock.

It calls the same pure `create_allocation_plan` the live scheduler calls (or a baseline
with its signature), and plays out the consequences: jobs start after their start-up time
(shorter when the node holds the model warm), compute at the planner's speed for the
replicas they were given, crash where the trace says, back off and resume from the request
cache (finished work is kept), and get preempted if the policy says so. A running job that
the policy widens holds the new replica's GPUs at once and computes faster once the replica
has loaded (its warm start-up, the model being on the node already); one it narrows gives
the GPUs back at once (the batch in hand is a rounding error here). The policy only ever
sees estimates; the simulator knows the truth.

With `NodeFailures`, a node is lost every `every_s` seconds (nodes in turn) and comes back
`repair_s` later; the jobs on it are requeued at once. evalfleet resumes them from the
request cache, losing only the batches in flight; `restart_from_zero=True` plays the usual
alternative (lm-eval has no request cache), where a job starts over.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from evalfleet.orchestrator.demand import Device
from evalfleet.orchestrator.policy import QueuedJob, Resize, RunningJob, Scheduler, Start
from evalfleet.orchestrator.recovery import RecoveryOptions, backoff_seconds
from evalfleet.orchestrator.workload import TraceJob
from evalfleet.planning import Inventory


@dataclass
class _Job:
    spec: TraceJob
    done: float = 0.0
    """Fraction of the true work finished (kept in the request cache)."""
    failures: int = 0
    not_before: float = 0.0
    first_start: float | None = None
    finished: float | None = None
    failed: bool = False


@dataclass
class _Attempt:
    job: _Job
    start: Start
    began: float
    compute_from: float
    rate: float
    expected_end: float
    end: float
    serial: int
    devices: list[Device] | None = None
    """The GPUs it holds now (its start's, plus replicas joined, less replicas given back)."""
    crash_after: float | None = None
    """True tokens it computes before the trace's crash, if it crashes."""
    replicas: int = 0
    counted_to: float = 0.0
    """Its compute and GPU time are counted up to here (its width may change later)."""

    def __post_init__(self) -> None:
        self.devices = list(self.start.devices) if self.devices is None else self.devices
        self.replicas = self.replicas or self.start.replicas
        self.counted_to = self.counted_to or self.began

    @property
    def computing_from(self) -> float:
        return max(self.compute_from, self.counted_to)

    def eta(self, now: float) -> float:
        """What the live scheduler would know: the estimate until the worker reports progress,
        then the end that its measured rate and request count imply."""
        return self.end if now >= self.compute_from else self.expected_end


@dataclass(frozen=True)
class NodeFailures:
    every_s: float
    repair_s: float = 3600.0
    restart_from_zero: bool = False
    in_flight_s: float = 10.0
    """Compute lost with the batches a resumed job had in flight when its node died."""
    max_losses: int = 200
    """Losses stop after this many, so a job that never outlives a node's uptime still ends."""


@dataclass
class ClassStats:
    jobs: int
    mean_completion_s: float
    p95_completion_s: float
    mean_wait_s: float
    p95_wait_s: float


@dataclass
class SimulationReport:
    jobs: int
    gpus: int
    makespan_s: float
    lower_bound_s: float
    makespan_over_lower_bound: float
    gpu_utilization: float
    per_priority: dict[str, ClassStats]
    failures: int = 0
    failed_jobs: int = 0
    preemptions: int = 0
    grows: int = 0
    """Replicas that running jobs gained (live elastic width)."""
    shrinks: int = 0
    """Replicas that running jobs gave back to a higher-priority job."""
    unfinished: int = 0
    warm_starts: int = 0
    starts: int = 0
    rounds: int = 0
    nodes_lost: int = 0
    jobs_hit_by_node_loss: int = 0
    lost_gpu_s: float = 0.0
    """GPU-seconds of finished compute thrown away by node losses (to be computed again)."""
    restart_gpu_s: float = 0.0
    """GPU-seconds spent starting up again after node losses."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), without numpy."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def lower_bound(trace: Sequence[TraceJob], gpus: int) -> float:
    """No schedule beats max(total GPU-seconds / GPUs, latest arrival + its fastest run).

    Each job counts at its cheapest replica count with a warm start, on its true work:
    a bound every policy, however lucky, must respect.
    """
    start = min(job.arrival for job in trace)
    work, longest = 0.0, 0.0
    for job in trace:
        truth = job.demand.with_work(job.true_work_tokens)
        runs = [truth.runtime(k, warm=True) for k in range(1, truth.max_replicas + 1)]
        work += min(k * truth.replica_gpus * run for k, run in enumerate(runs, start=1))
        longest = max(longest, job.arrival - start + min(runs))
    return max(work / gpus, longest)


def simulate(
    trace: Sequence[TraceJob],
    inventory: Inventory,
    scheduler: Scheduler,
    *,
    recovery: RecoveryOptions = RecoveryOptions(),
    node_failures: NodeFailures | None = None,
) -> SimulationReport:
    """Play `trace` on `inventory` under `scheduler` until every job succeeded or failed for good."""
    jobs = {spec.id: _Job(spec) for spec in trace}
    gpus = inventory.device_count
    events: list[tuple[float, int, str, str]] = []
    serial = 0

    def push(at: float, kind: str, job_id: str) -> int:
        nonlocal serial
        serial += 1
        heapq.heappush(events, (at, serial, kind, job_id))
        return serial

    for spec in trace:
        push(spec.arrival, "arrive", spec.id)
    if node_failures is not None:
        push(node_failures.every_s, "node_down", "0")
    down: dict[int, float] = {}  # node index -> when it comes back
    arrived: set[str] = set()
    running: dict[str, _Attempt] = {}
    warm: dict[Device, str] = {}
    busy_gpu_s = 0.0
    counts = {"failures": 0, "preemptions": 0, "warm": 0, "starts": 0, "rounds": 0, "nodes_lost": 0, "hit": 0,
              "grows": 0, "shrinks": 0}
    losses = {"lost_gpu_s": 0.0, "restart_gpu_s": 0.0}

    def bank(attempt: _Attempt, now: float) -> None:
        """Count what it computed and the GPUs it held up to `now` (before its width changes)."""
        nonlocal busy_gpu_s
        busy_gpu_s += len(attempt.devices) * (now - attempt.counted_to)
        computed = max(0.0, now - attempt.computing_from) * attempt.rate
        attempt.counted_to = now
        job = attempt.job
        job.done = min(1.0, job.done + computed / job.spec.true_work_tokens) if job.spec.true_work_tokens else 1.0
        if attempt.crash_after is not None:
            attempt.crash_after = max(0.0, attempt.crash_after - computed)

    def stop(attempt: _Attempt, now: float) -> None:
        del running[attempt.job.spec.id]
        bank(attempt, now)

    def schedule_end(attempt: _Attempt) -> None:
        """Its finish (or crash) at its current rate, replacing any earlier one."""
        spec = attempt.job.spec
        left = spec.true_work_tokens * (1 - attempt.job.done)
        attempt.end = attempt.computing_from + left / attempt.rate
        if attempt.crash_after is not None:
            attempt.serial = push(attempt.computing_from + attempt.crash_after / attempt.rate, "crash", spec.id)
        else:
            attempt.serial = push(attempt.end, "finish", spec.id)

    def resize(order: Resize, now: float, grow: bool) -> None:
        """A replica joins (computing after its warm load) or leaves (at once) a running job."""
        attempt = running[order.job_id]
        demand = attempt.job.spec.demand
        bank(attempt, now)
        if grow:
            attempt.devices += order.devices
            warm.update({d: demand.model for d in order.devices})
            push(now + demand.warm_startup_s, "joined", order.job_id)
            counts["grows"] += 1
            return
        attempt.devices = [d for d in attempt.devices if d not in order.devices]
        attempt.replicas -= 1
        attempt.rate = demand.tokens_per_s[attempt.replicas - 1]
        counts["shrinks"] += 1
        schedule_end(attempt)

    def lose_node(attempt: _Attempt, now: float, failures: NodeFailures) -> None:
        """Stop a job whose node died; keep what the cache holds (or nothing, restarting from zero)."""
        job, gpus_used = attempt.job, len(attempt.devices)
        stop(attempt, now)
        losses["restart_gpu_s"] += gpus_used * (min(now, attempt.compute_from) - attempt.began)
        if failures.restart_from_zero:  # every token so far, at this attempt's speed
            lost_s = job.done * job.spec.true_work_tokens / attempt.rate
            job.done = 0.0
        else:
            lost_s = min(max(0.0, now - attempt.compute_from), failures.in_flight_s)
            job.done = max(0.0, job.done - lost_s * attempt.rate / job.spec.true_work_tokens)
        losses["lost_gpu_s"] += gpus_used * lost_s
        job.not_before = now

    def running_view(attempt: _Attempt, now: float) -> RunningJob:
        """What the live scheduler would see: its estimated work left, at its estimated speed."""
        spec, job = attempt.job.spec, attempt.job
        computed = max(0.0, now - attempt.computing_from) * attempt.rate
        done = min(1.0, job.done + computed / spec.true_work_tokens) if spec.true_work_tokens else 1.0
        joining = (len(attempt.devices) // spec.demand.replica_gpus) > attempt.replicas
        return RunningJob(spec.id, tuple(attempt.devices), attempt.eta(now), spec.priority,
                          demand=spec.demand.with_work(spec.demand.work_tokens * (1 - done)),
                          resizable=not joining, load_s=spec.demand.warm_startup_s)

    def queue_view(now: float) -> list[QueuedJob]:
        waiting = [j for j in arrived if j not in running and jobs[j].finished is None and not jobs[j].failed]
        return [
            QueuedJob(j, jobs[j].spec.demand.with_work(jobs[j].spec.demand.work_tokens * (1 - jobs[j].done)),
                      jobs[j].spec.priority, jobs[j].spec.arrival, jobs[j].not_before)
            for j in sorted(waiting)
        ]

    def begin(start: Start, now: float) -> None:
        job = jobs[start.job_id]
        spec = job.spec
        is_warm = all(warm.get(d) == spec.demand.model for d in start.devices)
        counts["warm"] += is_warm
        counts["starts"] += 1
        startup = spec.demand.warm_startup_s if is_warm else spec.demand.startup_s
        rate = spec.demand.tokens_per_s[start.replicas - 1]
        left = spec.true_work_tokens * (1 - job.done)
        expected = now + spec.demand.with_work(spec.demand.work_tokens * (1 - job.done)).runtime(start.replicas)
        job.first_start = now if job.first_start is None else job.first_start
        warm.update({d: spec.demand.model for d in start.devices})
        crash_after = spec.failures[job.failures] * left if job.failures < len(spec.failures) else None
        attempt = _Attempt(job, start, now, now + startup, rate, expected, 0.0, 0, crash_after=crash_after)
        running[spec.id] = attempt
        schedule_end(attempt)

    now = 0.0
    while events:
        now = events[0][0]
        while events and events[0][0] <= now:
            _, event_serial, kind, job_id = heapq.heappop(events)
            attempt = running.get(job_id)
            if kind == "arrive":
                arrived.add(job_id)
            elif kind == "node_down":
                node = int(job_id)
                left = any(j.finished is None for j in jobs.values())
                if left and counts["nodes_lost"] < node_failures.max_losses:
                    counts["nodes_lost"] += 1
                    down[node] = now + node_failures.repair_s
                    push(now + node_failures.repair_s, "node_up", job_id)
                    push(now + node_failures.every_s, "node_down", str((node + 1) % len(inventory.nodes)))
                    for victim in [a for a in running.values() if any(d[0] == node for d in a.start.devices)]:
                        counts["hit"] += 1
                        lose_node(victim, now, node_failures)
            elif kind == "node_up":
                down.pop(int(job_id), None)
            elif kind == "joined" and attempt is not None:  # a replica it grew by has loaded
                bank(attempt, now)
                attempt.replicas += 1
                attempt.rate = attempt.job.spec.demand.tokens_per_s[attempt.replicas - 1]
                schedule_end(attempt)
            elif kind in ("finish", "crash") and attempt is not None and attempt.serial == event_serial:
                stop(attempt, now)
                job = jobs[job_id]
                if kind == "finish":
                    job.finished, job.done = now, 1.0
                    continue
                counts["failures"] += 1
                job.failures += 1
                if job.failures >= recovery.max_attempts:
                    job.failed, job.finished = True, now
                else:
                    job.not_before = now + backoff_seconds(job.failures, recovery)
                    push(job.not_before, "retry", job_id)
        for _ in range(3):  # a preemption frees GPUs that the same instant's next round can use
            counts["rounds"] += 1
            views = [running_view(a, now) for a in running.values()]
            gone = [(n, g) for n in down for g in range(len(inventory.nodes[n].gpus))]
            plan = scheduler(queue_view(now), inventory, views, now, warm=warm, quarantined=gone)
            for victim in plan.preempt:
                counts["preemptions"] += 1
                stop(running[victim], now)
            for start in plan.starts:
                begin(start, now)
            for order in plan.shrinks:
                resize(order, now, grow=False)
            for order in plan.grows:
                resize(order, now, grow=True)
            if not plan.preempt and not plan.shrinks:
                break

    finished = [j for j in jobs.values() if j.finished is not None]
    makespan = max((j.finished for j in finished), default=0.0) - min((s.arrival for s in trace), default=0.0)
    bound = lower_bound(trace, gpus) if trace else 0.0
    per_priority = {}
    for priority in ("high", "normal", "low"):
        group = [j for j in finished if j.spec.priority == priority and not j.failed]
        completion = [j.finished - j.spec.arrival for j in group]
        wait = [j.first_start - j.spec.arrival for j in group]
        per_priority[priority] = ClassStats(
            len(group), sum(completion) / max(len(group), 1), percentile(completion, 95),
            sum(wait) / max(len(group), 1), percentile(wait, 95),
        )
    return SimulationReport(
        jobs=len(trace), gpus=gpus, makespan_s=makespan, lower_bound_s=bound,
        makespan_over_lower_bound=makespan / bound if bound else 0.0,
        gpu_utilization=busy_gpu_s / (gpus * makespan) if makespan else 0.0,
        per_priority=per_priority, failures=counts["failures"],
        failed_jobs=sum(j.failed for j in jobs.values()), preemptions=counts["preemptions"],
        grows=counts["grows"], shrinks=counts["shrinks"],
        unfinished=sum(j.finished is None for j in jobs.values()),
        warm_starts=counts["warm"], starts=counts["starts"], rounds=counts["rounds"],
        nodes_lost=counts["nodes_lost"], jobs_hit_by_node_loss=counts["hit"], **losses,
    )
