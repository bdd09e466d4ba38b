"""Putting a layout on concrete GPUs: which (node, gpu) runs each rank.

Rules: a tensor-parallel group lives inside one node (its all-reduces need NVLink/PCIe, not the
network), and so does a device_map replica (one process holds its GPUs); a replica's pipeline stages stay in one node when some node can hold them all, and
otherwise span the fewest, largest nodes; busy GPUs and GPUs without `need_gb` free are never
used; among the rest, GPUs with more free memory come first. A replica that fits a node goes to
the node it fills best, which keeps whole nodes free for the big jobs a scheduler sees next.
"""

from __future__ import annotations

from collections.abc import Collection

from evalfleet.planning.hardware import Inventory
from evalfleet.planning.strategy import ParallelLayout
from evalfleet.types import EvalfleetError

Device = tuple[int, int]


class PlacementError(EvalfleetError):
    """The layout cannot be placed on the usable GPUs; the message says why in one sentence."""


def usable_devices(
    inventory: Inventory, busy: Collection[Device] = frozenset(), need_gb: float = 0.0
) -> list[list[int]]:
    """Per node, the indices of GPUs that are not busy and have `need_gb` free, most free memory first."""
    usable = []
    for n, node in enumerate(inventory.nodes):
        gpus = [(g, gpu.free_gb) for g, gpu in enumerate(node.gpus) if (n, g) not in busy and gpu.free_gb >= need_gb]
        gpus.sort(key=lambda item: (-item[1], item[0]))
        usable.append([g for g, _ in gpus])
    return usable


def place(
    layout: ParallelLayout,
    inventory: Inventory,
    busy: Collection[Device] = frozenset(),
    need_gb: float = 0.0,
) -> list[Device]:
    """The device of each rank, dp-major (replica, then stage, then tp rank); raises PlacementError."""
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    group = "a tensor-parallel group"
    if layout.device_map:  # placed as one group of pp GPUs inside a node
        tp, pp, group = pp, 1, "a device_map replica"
    usable = usable_devices(inventory, busy, need_gb)
    if layout.total_gpus > 1 and inventory.is_cpu_only:
        raise PlacementError(
            f"the CPU is one device and cannot hold {layout.total_gpus} ranks (tp={tp}, pp={pp}, dp={dp})"
        )
    largest = max((len(gpus) for gpus in usable), default=0)
    if largest < tp:
        memory = f" with {need_gb:.1f} GB free" if need_gb > 0 else ""
        raise PlacementError(
            f"{group} of {tp} GPUs must stay inside one node, and no node has {tp} "
            f"usable GPUs{memory} (the most is {largest})"
        )
    capacity = [len(gpus) // tp for gpus in usable]
    if sum(capacity) < pp * dp:
        raise PlacementError(
            f"the layout needs {pp * dp} groups of {tp} GPUs within a node ({layout.total_gpus} GPUs), "
            f"but only {sum(capacity)} such groups are usable"
        )
    placement: list[Device] = []
    for _ in range(dp):
        for node in _nodes_for_replica(capacity, pp):
            group = sorted(usable[node][:tp])
            del usable[node][:tp]
            capacity[node] -= 1
            placement.extend((node, g) for g in group)
    return placement


def _nodes_for_replica(capacity: list[int], pp: int) -> list[int]:
    """The node of each stage: one node that fits all stages best, else the largest nodes in turn."""
    whole = [n for n, groups in enumerate(capacity) if groups >= pp]
    if whole:
        node = min(whole, key=lambda n: (capacity[n], n))
        return [node] * pp
    stages: list[int] = []
    for node in sorted(range(len(capacity)), key=lambda n: (-capacity[n], n)):
        take = min(capacity[node], pp - len(stages))
        stages.extend([node] * take)
        if len(stages) == pp:
            break
    return stages
