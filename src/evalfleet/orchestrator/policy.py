"""The scheduling policy: which queued jobs start now, on which GPUs, and what waits.

`create_allocation_plan` is a pure function of its arguments (no I/O, no clock), so the
simulator and the live scheduler run exactly the same decisions. It combines:

- priority classes with aging: a job's rank grows by one class per `aging_s` of waiting,
  so no job starves;
- gang allocation: a job starts with all the GPUs of its replicas or not at all; each
  replica is placed by the planner (`planning.place`), which keeps a tp group in one node;
- EASY backfill: the first job that cannot start gets a reservation (the earliest time and
  the GPUs at which it can); later jobs may start only on GPUs outside the reservation or
  if they will end before it begins;
- elastic data parallelism: a job asks for the fewest replicas that finish within the
  backlog's horizon (narrow under a deep queue, wide when it is short, so no job straggles
  at the end); it starts with fewer when that finishes sooner than waiting for more, and
  GPUs nobody else can use widen the jobs that start;
- live elastic width: a running job whose worker can add and drop replicas grows by one
  when GPUs are idle that no waiting job can use, if it then finishes sooner despite the
  new replica's load time; it gives one back (keeping its other replicas working) when a
  job of a higher class would otherwise wait longer than such a replica takes to load and
  finishes sooner for starting at once;
- model affinity: replicas prefer GPUs that last ran the same model (warm page cache);
- a job retried after a failure is placed off the devices it failed on where the pool has room;
- optional preemption: a job kept waiting long enough may stop lower-class jobs, which
  later resume from the request cache; never one whose restart costs more than the wait.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from evalfleet.orchestrator.demand import PRIORITY_RANK, Device, JobDemand
from evalfleet.planning import Inventory, ParallelLayout, PlacementError, place


@dataclass(frozen=True)
class QueuedJob:
    id: str
    demand: JobDemand
    priority: str = "normal"
    submitted_at: float = 0.0
    not_before: float = 0.0
    preemptible: bool = True


@dataclass(frozen=True)
class RunningJob:
    id: str
    devices: tuple[Device, ...]
    expected_end: float
    priority: str = "normal"
    preemptible: bool = True
    demand: JobDemand | None = None
    """Its remaining work, at the speed measured so far where there is one."""
    resizable: bool = False
    """Its worker adds and drops replicas while it runs."""
    leaving: tuple[Device, ...] = ()
    """Devices of replicas it was asked to give back and still holds (free once its batch in hand ends)."""
    load_s: float | None = None
    """Measured seconds to load one of its replicas, if its worker reported it."""

    @property
    def replicas(self) -> int:
        """Replicas it keeps (not counting those leaving)."""
        if self.demand is None:
            return 1
        return (len(self.devices) - len(self.leaving)) // self.demand.replica_gpus

    @property
    def replica_load_s(self) -> float:
        """What one more replica (or one given back and later reloaded) costs: measured, else the planner's."""
        if self.load_s:
            return self.load_s
        return self.demand.startup_s if self.demand is not None else 60.0


@dataclass(frozen=True)
class PolicyOptions:
    aging_s: float = 4 * 3600.0
    """Waiting this long raises a job by one priority class."""
    backfill: bool = True
    elastic: bool = True
    affinity: bool = True
    preemption: bool = False
    preempt_after_s: float = 600.0
    """A reserved job whose start is further away than this may preempt lower classes."""
    resize: bool = True
    """Grow and shrink running jobs whose workers can (live elastic data parallelism)."""
    min_growth_gain: float = 0.1
    """A growth must cut the job's remaining time by this share at least (no churn for crumbs)."""


@dataclass(frozen=True)
class Start:
    job_id: str
    devices: tuple[Device, ...]
    replicas: int
    expected_end: float
    warm: bool = False
    backfilled: bool = False


@dataclass(frozen=True)
class Reservation:
    job_id: str
    devices: frozenset[Device]
    start_at: float


@dataclass(frozen=True)
class Resize:
    """One replica (its devices) that a running job gains (`grows`) or gives back (`shrinks`)."""

    job_id: str
    devices: tuple[Device, ...]
    reason: str = ""


@dataclass(frozen=True)
class AllocationPlan:
    starts: tuple[Start, ...] = ()
    preempt: tuple[str, ...] = ()
    reservation: Reservation | None = None
    waiting: Mapping[str, str] = field(default_factory=dict)
    grows: tuple[Resize, ...] = ()
    shrinks: tuple[Resize, ...] = ()


T = TypeVar("T")
Scheduler = Callable[..., AllocationPlan]
"""`create_allocation_plan`'s signature: (queue, inventory, running, now, *, quarantined, warm)."""


def effective_rank(job: QueuedJob, now: float, aging_s: float) -> float:
    waited = max(0.0, now - job.submitted_at)
    return PRIORITY_RANK[job.priority] + (waited / aging_s if aging_s > 0 else 0.0)


def queue_order(queue: Iterable[QueuedJob], now: float, aging_s: float) -> list[QueuedJob]:
    """Highest effective rank first; ties by submission time, then id (deterministic)."""
    return sorted(queue, key=lambda j: (-effective_rank(j, now, aging_s), j.submitted_at, j.id))


class ReplicaPlacer:
    """Places replicas one at a time with `planning.place`, remembering shapes that cannot fit.

    A shape that failed on a set of GPUs fails on any subset of it, so the memo answers
    most of the simulator's placement calls without asking the planner.
    """

    def __init__(self, inventory: Inventory, warm: Mapping[Device, str], affinity: bool) -> None:
        self.inventory = inventory
        self.all = frozenset((n, g) for n, node in enumerate(inventory.nodes) for g in range(len(node.gpus)))
        self.warm = warm
        self.affinity = affinity
        self._failed: dict[tuple[int, int, float], list[frozenset[Device]]] = {}

    def one(self, demand: JobDemand, avail: frozenset[Device]) -> tuple[Device, ...] | None:
        if demand.avoid:  # off the devices its last attempt failed on, where there is room
            elsewhere = avail - frozenset(demand.avoid)
            found = self.one(replace(demand, avoid=()), elsewhere) if elsewhere != avail else None
            if found is not None:
                return found
            demand = replace(demand, avoid=())
        shape = (demand.tp, demand.pp, demand.need_gb)
        if len(avail) < demand.replica_gpus or any(avail <= s for s in self._failed.get(shape, ())):
            return None
        layout = ParallelLayout(demand.tp, demand.pp, 1)
        if self.affinity:
            preferred = frozenset(d for d in avail if self.warm.get(d) == demand.model)
            if len(preferred) >= demand.replica_gpus:
                found = self._try(layout, self.all - preferred, demand.need_gb)
                if found is not None:
                    return found
        found = self._try(layout, self.all - avail, demand.need_gb)
        if found is None:
            self._failed.setdefault(shape, []).append(avail)
        return found

    def _try(self, layout: ParallelLayout, busy: frozenset[Device], need_gb: float) -> tuple[Device, ...] | None:
        try:
            return tuple(tuple(d) for d in place(layout, self.inventory, busy, need_gb))
        except PlacementError:
            return None

    def replicas(self, demand: JobDemand, avail: frozenset[Device], limit: int) -> list[tuple[Device, ...]]:
        placed: list[tuple[Device, ...]] = []
        while len(placed) < limit:
            devices = self.one(demand, avail)
            if devices is None:
                break
            placed.append(devices)
            avail = avail - frozenset(devices)
        return placed

    def is_warm(self, demand: JobDemand, devices: Sequence[Device]) -> bool:
        return all(self.warm.get(d) == demand.model for d in devices)


def create_allocation_plan(
    queue: Sequence[QueuedJob],
    inventory: Inventory,
    running: Sequence[RunningJob],
    now: float,
    *,
    options: PolicyOptions = PolicyOptions(),
    quarantined: Iterable[Device] = (),
    warm: Mapping[Device, str] | None = None,
) -> AllocationPlan:
    placer = ReplicaPlacer(inventory, warm or {}, options.affinity)
    # A replica being given back frees its devices as soon as its batch in hand ends.
    occupied = [(_assumed_end(r, now), frozenset(r.devices) - frozenset(r.leaving)) for r in running]
    occupied += [(now, frozenset(r.leaving)) for r in running if r.leaving]
    free = placer.all - frozenset(quarantined) - frozenset(d for _, devs in occupied for d in devs)
    blocked = frozenset(quarantined)
    starts: list[Start] = []
    waiting: dict[str, str] = {}
    reservation: Reservation | None = None
    preempt: tuple[str, ...] = ()
    shrinks: list[Resize] = []

    def begin(job: QueuedJob, replicas: list[tuple[Device, ...]], backfilled: bool) -> None:
        nonlocal free
        devices = tuple(d for r in replicas for d in r)
        warm_start = placer.is_warm(job.demand, devices)
        end = now + job.demand.runtime(len(replicas), warm=warm_start)
        starts.append(Start(job.id, devices, len(replicas), end, warm_start, backfilled))
        occupied.append((end, frozenset(devices)))
        free = free - frozenset(devices)

    eligible = queue_order((j for j in queue if j.not_before <= now), now, options.aging_s)
    # The backlog's horizon: how long the pool needs for all known work. A job gets the
    # fewest replicas that finish within it: narrow (cheapest) under a deep backlog, wide
    # when the queue is short, and never so narrow that it straggles long after the rest.
    backlog = sum(j.demand.min_gpu_seconds() for j in eligible)
    backlog += sum(len(devices) * (end - now) for end, devices in occupied)
    horizon = backlog / max(1, len(placer.all - blocked))
    for job in eligible:
        demand = job.demand
        target = demand.replicas_within(horizon) if options.elastic else demand.max_replicas
        if reservation is None:
            fewest = demand.min_replicas if options.elastic else target
            choice = _best_start(placer, demand, fewest, target, free, occupied, blocked, now)
            if choice is None:
                waiting[job.id] = "does not fit the GPUs that are not quarantined"
                continue
            at, replicas = choice
            if at is None:
                begin(job, replicas, backfilled=False)
                continue
            reservation = Reservation(job.id, frozenset(d for r in replicas for d in r), at)
            waiting[job.id] = f"reserved to start at t={at:.0f} with {len(replicas)} replica(s)"
            # Taking GPUs from running jobs must let this one finish sooner than waiting would, or
            # the next round, seeing the GPUs free, would still choose to wait (and they would churn).
            waited = at + demand.runtime(len(replicas))
            if options.resize:
                shrinks, devices = _shrink_for(placer, job, target, free, running, blocked, at - now)
                if shrinks and now + demand.runtime(len(devices) // demand.replica_gpus) < waited:
                    reservation = Reservation(job.id, devices, now)
                    victims = sorted({s.job_id for s in shrinks})
                    waiting[job.id] = f"waiting for {', '.join(victims)} to give back {len(shrinks)} replica(s)"
                    continue
                shrinks = []
            if options.preemption and at - now > options.preempt_after_s:
                victims, devices = _victims(placer, job, target, free, running, blocked, at - now)
                if victims and now + demand.runtime(len(devices) // demand.replica_gpus) < waited:
                    preempt = victims
                    reservation = Reservation(job.id, devices, now)
                    waiting[job.id] = f"preempting {', '.join(preempt)}"
            continue
        if not options.backfill:
            waiting[job.id] = f"behind {reservation.job_id}"
            continue
        replicas = _backfill(placer, demand, target, free, reservation, now)
        if replicas:
            begin(job, replicas, backfilled=True)
        else:
            waiting[job.id] = f"no GPUs free without delaying {reservation.job_id}"

    # Idle devices no waiting job can use: first to the jobs starting now, then to running ones.
    usable = free if reservation is None else free - reservation.devices
    if options.elastic:
        demands = {j.id: j.demand for j in queue}
        for i, start in enumerate(starts):
            starts[i] = _widen(placer, start, demands[start.job_id], usable, now)
            usable = usable - frozenset(starts[i].devices)
    grows: list[Resize] = []
    if options.resize:
        grows = _grow(placer, running, usable, options.min_growth_gain)
    return AllocationPlan(tuple(starts), preempt, reservation, waiting, tuple(grows), tuple(shrinks))


def _assumed_end(job: RunningJob, now: float) -> float:
    """A job past its estimate is assumed to overrun by as much again (at least a minute)."""
    if job.expected_end > now:
        return job.expected_end
    return now + max(60.0, now - job.expected_end)


def _best_start(
    placer: ReplicaPlacer,
    demand: JobDemand,
    fewest: int,
    most: int,
    free: frozenset[Device],
    occupied: list[tuple[float, frozenset[Device]]],
    blocked: frozenset[Device],
    now: float,
) -> tuple[float | None, list[tuple[Device, ...]]] | None:
    """When to start (None: now, on free GPUs), and on which replicas, to finish soonest.

    Walks the moments GPUs free up if running jobs end as estimated: at each, as many
    replicas as fit (up to `most`) finish at that moment plus their runtime. Starting now
    on fewer replicas wins whenever it finishes before waiting for more would.
    """
    best: tuple[float, float | None, list[tuple[Device, ...]]] | None = None
    avail = free
    moments = [(None, frozenset())] + sorted(occupied, key=lambda item: (item[0], sorted(item[1])))
    for at, devices in moments:
        avail = avail | (devices - blocked)
        bound = min(most, len(avail) // demand.replica_gpus)
        if bound < fewest or (best is not None and bound <= len(best[2])):
            continue
        found = placer.replicas(demand, avail, most)
        if len(found) < fewest:
            continue
        finish = (now if at is None else at) + demand.runtime(len(found))
        if best is None or finish < best[0]:
            best = (finish, at, found)
        if len(found) == most:
            break
    return None if best is None else (best[1], best[2])


def _backfill(
    placer: ReplicaPlacer,
    demand: JobDemand,
    target: int,
    free: frozenset[Device],
    reservation: Reservation,
    now: float,
) -> list[tuple[Device, ...]]:
    """Replicas that cannot delay the reservation: `target` of them off its GPUs, or as many
    as end before it starts (fewer than `target` would straggle past the backlog's horizon)."""
    outside = placer.replicas(demand, free - reservation.devices, target)
    if len(outside) >= target:
        return outside
    anywhere = placer.replicas(demand, free, target)
    while anywhere and now + demand.runtime(len(anywhere)) > reservation.start_at:
        anywhere.pop()
    return anywhere if len(anywhere) >= demand.min_replicas else []


def _victims(
    placer: ReplicaPlacer,
    job: QueuedJob,
    replicas: int,
    free: frozenset[Device],
    running: Sequence[RunningJob],
    blocked: frozenset[Device],
    wait_s: float,
) -> tuple[tuple[str, ...], frozenset[Device]]:
    """Lower-class preemptible jobs whose GPUs, added to the free ones, let `job` start now.

    A job whose restart (process start and model load, the planner's estimate) would cost
    more than `job` saves by not waiting is not stopped.
    """
    rank = PRIORITY_RANK[job.priority]
    candidates = sorted(
        (r for r in running if r.preemptible and PRIORITY_RANK[r.priority] < rank
         and (r.demand is None or r.demand.startup_s < wait_s)),
        key=lambda r: (PRIORITY_RANK[r.priority], -r.expected_end, r.id),
    )
    needed, used = _first_fit(placer, job, replicas, free, blocked, ((v.id, v.devices) for v in candidates))
    return tuple(needed), used


def _first_fit(placer: ReplicaPlacer, job: QueuedJob, replicas: int, free: frozenset[Device],
               blocked: frozenset[Device], offers: Iterable[tuple[T, Sequence[Device]]]) -> tuple[list[T], frozenset[Device]]:
    """Offers of devices (a victim's, a replica given back) taken in order until `job` can start
    now with its fewest replicas: the offers whose devices that start uses, and those devices."""
    avail, taken = free, []
    for offer, devices in offers:
        avail = avail | (frozenset(devices) - blocked)
        taken.append((offer, frozenset(devices)))
        found = placer.replicas(job.demand, avail, replicas)
        if len(found) >= max(job.demand.min_replicas, 1):
            used = frozenset(d for r in found for d in r)
            return [offer for offer, devices in taken if used & devices], used
    return [], frozenset()


def _widen(placer: ReplicaPlacer, start: Start, demand: JobDemand, usable: frozenset[Device], now: float) -> Start:
    """Give a starting job extra replicas from idle GPUs that no waiting job could take."""
    extra_max = demand.max_replicas - start.replicas
    if extra_max <= 0 or not usable:
        return start
    extra = placer.replicas(demand, usable, extra_max)
    while extra and demand.runtime(start.replicas + len(extra)) >= demand.runtime(start.replicas):
        extra.pop()
    if not extra:
        return start
    devices = start.devices + tuple(d for r in extra for d in r)
    warm = start.warm and placer.is_warm(demand, devices)
    end = now + demand.runtime(start.replicas + len(extra), warm=warm)
    return Start(start.job_id, devices, start.replicas + len(extra), end, warm, start.backfilled)


def _replica_devices(job: RunningJob) -> list[tuple[Device, ...]]:
    """A running job's replicas that are not leaving, in placement order (the newest last)."""
    assert job.demand is not None
    kept = [d for d in job.devices if d not in frozenset(job.leaving)]
    size = job.demand.replica_gpus
    return [tuple(kept[i:i + size]) for i in range(0, len(kept) - size + 1, size)]


def _shrink_for(placer: ReplicaPlacer, job: QueuedJob, replicas: int, free: frozenset[Device],
                running: Sequence[RunningJob], blocked: frozenset[Device],
                wait_s: float) -> tuple[list[Resize], frozenset[Device]]:
    """Replicas that lower-class running jobs can give back (keeping their fewest) so `job` starts now.

    Giving one back costs its job no reload, only speed, but taking it back later costs a
    replica load; so a job is asked only when `job` would otherwise wait longer than that.
    The newest replicas go first, from the lowest class and the latest-ending job.
    """
    rank = PRIORITY_RANK[job.priority]
    donors = sorted(
        (r for r in running if r.resizable and r.demand is not None and PRIORITY_RANK[r.priority] < rank
         and r.replicas > r.demand.min_replicas and r.replica_load_s < wait_s),
        key=lambda r: (PRIORITY_RANK[r.priority], -r.expected_end, r.id),
    )
    reason = f"{job.id} ({job.priority}) would wait {wait_s:.0f}s"
    offers = (
        (Resize(donor.id, devices, reason), devices)
        for donor in donors
        for devices in reversed(_replica_devices(donor)[-(donor.replicas - donor.demand.min_replicas):])
    )
    return _first_fit(placer, job, replicas, free, blocked, offers)


def growth_pays(demand: JobDemand, replicas: int, load_s: float, min_gain: float) -> bool:
    """Whether one more replica, contributing only after `load_s`, cuts the remaining time by `min_gain`.

    Meanwhile the job's `replicas` keep working, so a job that ends before the new replica
    is loaded gains nothing.
    """
    if replicas >= demand.max_replicas:
        return False
    now_rate, grown_rate = demand.tokens_per_s[replicas - 1], demand.tokens_per_s[replicas]
    alone = demand.work_tokens / now_rate
    if alone <= load_s or grown_rate <= now_rate:
        return False
    grown = load_s + (demand.work_tokens - load_s * now_rate) / grown_rate
    return grown <= alone * (1 - min_gain)


def _grow(placer: ReplicaPlacer, running: Sequence[RunningJob], usable: frozenset[Device],
          min_gain: float) -> list[Resize]:
    """Idle GPUs that no waiting job can use go to running jobs that finish sooner with them.

    One replica per job per round (the next round sees its measured speed), higher classes first.
    """
    grows = []
    for job in sorted(running, key=lambda r: (-PRIORITY_RANK[r.priority], r.expected_end, r.id)):
        if not job.resizable or job.demand is None or job.leaving or not usable:
            continue
        if not growth_pays(job.demand, job.replicas, job.replica_load_s, min_gain):
            continue
        devices = placer.one(job.demand, usable)
        if devices is None:
            continue
        grows.append(Resize(job.id, devices, f"{len(usable)} idle device(s) no waiting job can use"))
        usable = usable - frozenset(devices)
    return grows
