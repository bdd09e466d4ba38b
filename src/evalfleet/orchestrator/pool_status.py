"""`evalfleet pool` and `evalfleet release`: the pool as the store sees it, and giving a device back.

The pool is the one the running (or last) scheduler recorded in the store, else this
machine. Each device shows the job holding it (placed or running) and, if quarantined,
why and on what evidence. New executors add fields to these models (nodes and ranks of a
Ray cluster, say) without changing how the document is assembled.
"""

from __future__ import annotations

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
    gpus: list[DeviceStatus]


class PoolStatus(BaseModel):
    source: str = Field(description="'scheduler' (recorded by the scheduler) or 'this machine'")
    nodes: list[NodeStatus]
    quarantined: list[Quarantine]


def pool_status(store: JobStore, inventory: Inventory | None = None) -> PoolStatus:
    """Every device of the pool with the job that holds it and its quarantine, if any."""
    source = "given"
    if inventory is None:
        recorded = recorded_pool(store)
        source = "scheduler" if recorded else "this machine"
        inventory = inventory_from_dict(recorded["inventory"]) if recorded else Inventory.detect()
    holders: dict[Device, tuple[str, str]] = {}
    for record in store.list([JobState.PLACED, JobState.RUNNING]):
        for device in record.placement or ():
            holders[tuple(device)] = (record.id, record.state.value)
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
        nodes.append(NodeStatus(node=n, name=node.name or f"node{n}", gpus=devices))
    return PoolStatus(source=source, nodes=nodes, quarantined=quarantined)


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
        for device in node.gpus:
            job = f"{device.job} ({device.job_state})" if device.job else "-"
            quarantine = device.quarantine.reason if device.quarantine else "-"
            table.add_row(node.name, str(device.gpu), f"{device.name} {device.total_gb:g} GB", job, quarantine)
    return table
