"""A Ray cluster as the scheduler's pool.

Placements index nodes by position, and they are kept in the store across restarts, so a
node keeps its position for good: a node that dies stays in the list with no GPUs (they leave
the pool), and a node that joins is appended. The order is recorded in the store with the pool,
so a restarted scheduler reads old placements the same way.

Each node's GPUs come from its Ray resources: `GPU` for the count, `accelerator_type:*` for the
model (its datasheet memory). A node that declares GPUs without a type (a CPU test cluster)
offers its share of the node's memory per GPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from evalfleet.orchestrator.pool import recorded_pool
from evalfleet.orchestrator.store import JobStore
from evalfleet.planning import GPU, Inventory, Node
from evalfleet.planning.hardware import UNKNOWN_GPU, find_spec

ACCELERATOR_PREFIX = "accelerator_type:"
DECLARED_GPU = "declared-GPU"


def node_gpus(resources: Mapping[str, float]) -> list[GPU]:
    """The GPUs a Ray node declares, as the planner sees them."""
    count = int(resources.get("GPU", 0))
    if count < 1:
        return []
    kinds = [key[len(ACCELERATOR_PREFIX):] for key in resources if key.startswith(ACCELERATOR_PREFIX)]
    spec = find_spec(kinds[0]) if kinds else None
    if spec is not None:
        return [GPU(spec.name, spec.memory_gb, spec.memory_gb, spec.compute_capability, spec)] * count
    share = round(resources.get("memory", 0) / 2**30 / count, 2)
    return [GPU(kinds[0] if kinds else DECLARED_GPU, share, share, None, UNKNOWN_GPU)] * count


def inventory_from_ray(entries: Iterable[Mapping[str, Any]], order: Sequence[str] = ()) -> tuple[Inventory, list[str]]:
    """The pool from `ray.nodes()`: live nodes with their GPUs, dead or GPU-less ones empty.

    Nodes keep their position in `order`; unseen ones with GPUs are appended. Returns the
    inventory and the new order (node ids, one per inventory node).
    """
    live = {entry["NodeID"]: entry for entry in entries if entry.get("Alive")}
    order = list(order)
    order += sorted(node for node, entry in live.items()
                    if node not in order and entry.get("Resources", {}).get("GPU", 0) >= 1)
    nodes = []
    for node_id in order:
        entry = live.get(node_id)
        gpus = node_gpus(entry.get("Resources", {})) if entry else []
        nodes.append(Node(gpus, interconnect="ray", name=node_id))
    return Inventory(nodes), order


def recorded_order(store: JobStore) -> list[str]:
    """The node order of the pool the last scheduler recorded (empty for a fresh store)."""
    pool = recorded_pool(store)
    if not pool:
        return []
    return [node.get("name", "") for node in pool["inventory"]["nodes"]]
