"""`evalfleet pool`: the pool's nodes and GPUs, which job holds each, and where each job's ranks run.

A job's driver records where its ranks run (on a Ray cluster: the node of each rank) in the
store, so `status` and `pool` show it from any process.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from evalfleet.orchestrator.pool import recorded_pool
from evalfleet.orchestrator.states import JobState
from evalfleet.orchestrator.store import JobStore, resolve_db_path

RANKS_KEY = "ranks:"  # + job id


def record_ranks(store: JobStore, job_id: str, ranks: list[list[dict[str, Any]]]) -> None:
    store.set_meta(RANKS_KEY + job_id, ranks)


def job_ranks(store: JobStore, job_id: str) -> list[list[dict[str, Any]]] | None:
    """Per replica, per rank: the Ray node id, its address, pid and device; None if not on Ray."""
    return store.get_meta(RANKS_KEY + job_id)


def pool_document(store: JobStore) -> dict[str, Any]:
    """Nodes, their GPUs, which job holds each, quarantined devices with reasons (`pool --json`)."""
    pool = recorded_pool(store)
    holders: dict[tuple[int, int], str] = {}
    jobs = []
    for record in store.list([JobState.PLACED, JobState.RUNNING]):
        for device in record.placement or ():
            holders[tuple(device)] = record.id
        jobs.append({"id": record.id, "state": record.state.value, "devices": [list(d) for d in record.placement or ()],
                     "ranks": job_ranks(store, record.id)})
    quarantined = store.quarantined()
    nodes = []
    for n, node in enumerate(pool["inventory"]["nodes"] if pool else []):
        nodes.append({
            "index": n, "name": node.get("name", ""), "alive": bool(node["gpus"]),
            "gpus": [{"index": g, "name": gpu["name"], "memory_gb": gpu["total_gb"], "job": holders.get((n, g)),
                      "quarantined": quarantined.get((n, g))} for g, gpu in enumerate(node["gpus"])],
        })
    return {
        "description": pool["description"] if pool else None,
        "nodes": nodes,
        "jobs": jobs,
        "quarantined": [{"node": n, "gpu": g, "reason": reason} for (n, g), reason in sorted(quarantined.items())],
    }


def describe_ranks(ranks: list[list[dict[str, Any]]] | None) -> str:
    """`replica 0: rank 0 on node 1a2b3c4d (10.0.0.5), rank 1 on node 5e6f7a8b (10.0.0.6)`, one line per replica."""
    return "\n".join(
        f"replica {r}: " + ", ".join(f"rank {rank['rank']} on node {rank['node_id'][:8]} ({rank['address']})"
                                     for rank in replica)
        for r, replica in enumerate(ranks or [])
    )


def pool_command(db: str | None, as_json: bool, console: Console | None = None) -> None:
    with JobStore(resolve_db_path(db)) as store:
        document = pool_document(store)
    if as_json:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return
    console = console or Console()
    table = Table(title=f"pool: {document['description'] or 'no scheduler has recorded one'}")
    for column in ("node", "name", "gpu", "type", "job", "quarantined"):
        table.add_column(column)
    for node in document["nodes"]:
        if not node["gpus"]:
            table.add_row(str(node["index"]), node["name"], "", "(gone)", "", "")
        for gpu in node["gpus"]:
            table.add_row(str(node["index"]), node["name"], str(gpu["index"]), gpu["name"], gpu["job"] or "",
                          gpu["quarantined"] or "")
    console.print(table)
    for job in document["jobs"]:
        if job["ranks"]:
            console.print(f"job {job['id']}:\n{describe_ranks(job['ranks'])}")
