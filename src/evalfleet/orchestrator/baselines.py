"""The two ways evaluations are usually scheduled, as policies the simulator can compare against.

- FIFO over the whole pool (lm-eval with `accelerate launch`): one job at a time, as many
  data-parallel replicas as the pool holds.
- FIFO with a fixed GPU count per job (OpenCompass' partitioned tasks): each job gets the
  same number of GPUs (or its minimum, if larger); strict order, no backfill.

Both keep `create_allocation_plan`'s signature and place through the same planner calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from evalfleet.orchestrator.demand import Device
from evalfleet.orchestrator.policy import AllocationPlan, QueuedJob, ReplicaPlacer, RunningJob, Scheduler, Start
from evalfleet.planning import Inventory


def _fifo(queue: Iterable[QueuedJob], now: float) -> list[QueuedJob]:
    return sorted((j for j in queue if j.not_before <= now), key=lambda j: (j.submitted_at, j.id))


def _free(placer: ReplicaPlacer, running: Sequence[RunningJob], quarantined: Iterable[Device]) -> frozenset[Device]:
    return placer.all - frozenset(quarantined) - frozenset(d for r in running for d in r.devices)


def fifo_whole_pool(
    queue: Sequence[QueuedJob],
    inventory: Inventory,
    running: Sequence[RunningJob],
    now: float,
    *,
    quarantined: Iterable[Device] = (),
    **_: Any,
) -> AllocationPlan:
    """The oldest job, alone, with every replica the pool holds."""
    if running:
        return AllocationPlan()
    placer = ReplicaPlacer(inventory, {}, affinity=False)
    free = _free(placer, running, quarantined)
    for job in _fifo(queue, now):
        replicas = placer.replicas(job.demand, free, job.demand.max_replicas)
        if len(replicas) >= job.demand.min_replicas:
            devices = tuple(d for r in replicas for d in r)
            return AllocationPlan((Start(job.id, devices, len(replicas), now + job.demand.runtime(len(replicas))),))
        return AllocationPlan(waiting={job.id: "does not fit the usable GPUs"})
    return AllocationPlan()


def fifo_fixed(gpus_per_job: int) -> Scheduler:
    """Strict FIFO where every job takes `gpus_per_job` GPUs (at least one whole replica)."""

    def schedule(
        queue: Sequence[QueuedJob],
        inventory: Inventory,
        running: Sequence[RunningJob],
        now: float,
        *,
        quarantined: Iterable[Device] = (),
        **_: Any,
    ) -> AllocationPlan:
        placer = ReplicaPlacer(inventory, {}, affinity=False)
        free = _free(placer, running, quarantined)
        starts = []
        for job in _fifo(queue, now):
            demand = job.demand
            want = min(max(gpus_per_job // demand.replica_gpus, demand.min_replicas, 1), demand.max_replicas)
            replicas = placer.replicas(demand, free, want)
            if len(replicas) < want:
                break
            devices = tuple(d for r in replicas for d in r)
            starts.append(Start(job.id, devices, want, now + demand.runtime(want)))
            free = free - frozenset(devices)
        return AllocationPlan(tuple(starts))

    return schedule
