"""`evalfleet pool` and `evalfleet release`: the pool as the store sees it, and giving a device back.

The pool is the one the running (or last) scheduler recorded in the store, else this
machine. Each device shows the job holding it (placed or running) and, if quarantined,
why and on what evidence. On a Ray cluster a node that went away stays in the list, not alive
and without GPUs, and a job's driver records the node of each of its ranks
(`record_ranks`), so `status` and `pool` show them from any process.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from rich.table import Table

from evalfleet.orchestrator.demand import Device
from evalfleet.orchestrator.pool import inventory_from_dict, recorded_pool
from evalfleet.orchestrator.states import JobState
from evalfleet.orchestrator.store import JobStore
from evalfleet.planning import Inventory
from evalfleet.types import UsageError


class Quarantine(BaseModel):
    node: int
    gpu: int
    at: float
    reason: str
    evidence: list[str] = Field(description="what the device reported, or the failures it rests on")


class DeviceStatus(BaseModel):
    gpu: int
    name: str
    total_gb: float
    job: str | None = Field(description="the placed or running job holding the device")
    job_state: str | None = None
    quarantine: Quarantine | None = None


class NodeStatus(BaseModel):
    node: int
    name: str
    alive: bool = Field(True, description="false for a Ray node that went away (it keeps its index, without GPUs)")
    gpus: list[DeviceStatus]


class RankPlace(BaseModel):
    rank: int
    node_id: str = Field(description="the Ray node id")
    address: str
    pid: int
    device: str


class JobRanks(BaseModel):
    job: str
    state: str
    replicas: list[list[RankPlace]] = Field(description="per replica, per rank: where it runs")


class PoolStatus(BaseModel):
    source: str = Field(description="'scheduler' (recorded by the scheduler) or 'this machine'")
    nodes: list[NodeStatus]
    quarantined: list[Quarantine]
    ranks: list[JobRanks] = Field(default_factory=list, description="placed or running jobs whose ranks run on Ray")


RANKS_KEY = "ranks:"  # + job id


def record_ranks(store: JobStore, job_id: str, ranks: list[list[dict[str, Any]]]) -> None:
    store.set_meta(RANKS_KEY + job_id, ranks)


def job_ranks(store: JobStore, job_id: str) -> list[list[dict[str, Any]]] | None:
    """Per replica, per rank: the Ray node id, its address, pid and device; None if not on Ray."""
    return store.get_meta(RANKS_KEY + job_id)


def describe_ranks(ranks: list[list[dict[str, Any]]] | None) -> str:
    """`replica 0: rank 0 on node 1a2b3c4d (10.0.0.5), rank 1 on node 5e6f7a8b (10.0.0.6)`, one line per replica."""
    return "\n".join(
        f"replica {r}: " + ", ".join(f"rank {rank['rank']} on node {rank['node_id'][:8]} ({rank['address']})"
                                     for rank in replica)
        for r, replica in enumerate(ranks or [])
    )


def pool_status(store: JobStore, inventory: Inventory | None = None) -> PoolStatus:
    """Every device of the pool with the job that holds it and its quarantine, if any."""
    source = "given"
    if inventory is None:
        recorded = recorded_pool(store)
        source = "scheduler" if recorded else "this machine"
        inventory = inventory_from_dict(recorded["inventory"]) if recorded else Inventory.detect()
    holders: dict[Device, tuple[str, str]] = {}
    ranks = []
    for record in store.list([JobState.PLACED, JobState.RUNNING]):
        for device in record.placement or ():
            holders[tuple(device)] = (record.id, record.state.value)
        if replicas := job_ranks(store, record.id):
            ranks.append(JobRanks(job=record.id, state=record.state.value,
                                  replicas=[[RankPlace.model_validate(rank) for rank in replica] for replica in replicas]))
    quarantined = [Quarantine(node=q["device"][0], gpu=q["device"][1], at=q["at"], reason=q["reason"],
                              evidence=q["evidence"]) for q in store.quarantine_records()]
    by_device = {(q.node, q.gpu): q for q in quarantined}
    nodes = []
    for n, node in enumerate(inventory.nodes):
        devices = []
        for g, gpu in enumerate(node.gpus):
            job, state = holders.get((n, g), (None, None))
            devices.append(DeviceStatus(gpu=g, name=gpu.name, total_gb=gpu.total_gb, job=job, job_state=state,
                                        quarantine=by_device.get((n, g))))
        nodes.append(NodeStatus(node=n, name=node.name or f"node{n}", alive=bool(node.gpus), gpus=devices))
    return PoolStatus(source=source, nodes=nodes, quarantined=quarantined, ranks=ranks)


def parse_device(text: str) -> Device:
    """`NODE:GPU`, or `GPU` for node 0."""
    parts = text.strip().split(":")
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or min(numbers) < 0:
        raise UsageError(f"device '{text}' is not NODE:GPU or GPU (for example 0:3 or 3)")
    return (0, numbers[0]) if len(numbers) == 1 else (numbers[0], numbers[1])


def release_device(store: JobStore, text: str) -> Device:
    """Return a quarantined device to the pool; a device that is not quarantined is a usage error."""
    device = parse_device(text)
    if not store.release(device):
        held = ", ".join(f"{n}:{g}" for n, g in sorted(store.quarantined())) or "none"
        raise UsageError(f"GPU {device[1]} of node {device[0]} is not quarantined (quarantined: {held})")
    return device


def pool_table(status: PoolStatus) -> Table:
    table = Table(title=f"pool ({status.source})")
    for column in ("node", "gpu", "device", "job", "quarantined"):
        table.add_column(column)
    for node in status.nodes:
        if not node.alive:
            table.add_row(node.name, "", "(gone)", "-", "-")
        for device in node.gpus:
            job = f"{device.job} ({device.job_state})" if device.job else "-"
            quarantine = device.quarantine.reason if device.quarantine else "-"
            table.add_row(node.name, str(device.gpu), f"{device.name} {device.total_gb:g} GB", job, quarantine)
    return table


def rank_lines(status: PoolStatus) -> list[str]:
    """Where each rank of the jobs on Ray runs, for below the table."""
    return [f"job {job.job}:\n" + describe_ranks([[rank.model_dump() for rank in replica] for replica in job.replicas])
            for job in status.ranks]
