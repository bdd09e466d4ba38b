"""Which devices a scheduler schedules over, and how `submit` (another process) learns them.

A running scheduler writes its pool into the store, so `evalfleet submit` checks a job
against the pool that will run it: a job that can never fit is refused at submit, not
found out hours later in the queue.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Any

from evalfleet.orchestrator.demand import describe_pool, slot_inventory
from evalfleet.orchestrator.store import JobStore
from evalfleet.planning import GPU, GPUSpec, Inventory, Node, parse_gpus
from evalfleet.types import UsageError

POOL_KEY = "pool"


def pool_from_options(gpus: str | None = None, slots: int | None = None) -> Inventory:
    """`--slots N` (CPU slots), `--gpus SPEC` (a spec, a cluster YAML, or `auto`), else this machine."""
    if gpus is not None and slots is not None:
        raise UsageError("use either --gpus or --slots, not both")
    if slots is not None:
        return slot_inventory(slots)
    return parse_gpus(gpus or "auto")


def inventory_to_dict(inventory: Inventory) -> dict[str, Any]:
    return asdict(inventory)


def inventory_from_dict(data: dict[str, Any]) -> Inventory:
    def gpu(entry: dict[str, Any]) -> GPU:
        spec = dict(entry["spec"])
        if spec.get("compute_capability") is not None:
            spec["compute_capability"] = tuple(spec["compute_capability"])
        capability = entry.get("compute_capability")
        return GPU(entry["name"], entry["total_gb"], entry["free_gb"], tuple(capability) if capability else None,
                   GPUSpec(**spec))

    return Inventory([Node([gpu(g) for g in node["gpus"]], **{k: v for k, v in node.items() if k != "gpus"})
                      for node in data["nodes"]])


def record_pool(store: JobStore, inventory: Inventory, *, max_attempts: int) -> None:
    """What a starting scheduler tells later `submit` calls: its pool and its retry budget."""
    store.set_meta(POOL_KEY, {
        "inventory": inventory_to_dict(inventory), "description": describe_pool(inventory),
        "max_attempts": max_attempts, "pid": os.getpid(), "started_at": time.time(),
    })


def recorded_pool(store: JobStore) -> dict[str, Any] | None:
    return store.get_meta(POOL_KEY)


def submission_pool(store: JobStore, spec: str | None = None) -> Inventory:
    """The pool a submitted job is checked against: `--pool SPEC`, else the scheduler's, else this machine."""
    if spec:
        return pool_from_options(spec)
    recorded = recorded_pool(store)
    if recorded is not None:
        return inventory_from_dict(recorded["inventory"])
    return Inventory.detect()
