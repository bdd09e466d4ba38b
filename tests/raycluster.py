"""A Ray cluster of several nodes on this machine (`ray.cluster_utils.Cluster`), for the Ray test modules."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Fast health checks, so a lost node is declared dead in about three seconds (defaults: ~14 s
# here); not faster, or a node busy on a loaded 2-core machine could be declared dead too.
FAST_HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}


@contextlib.contextmanager
def local_cluster(nodes: int, gpus_per_node: int) -> Iterator[Any]:
    """A head without GPUs and `nodes` nodes of `gpus_per_node` declared GPUs (`cluster.gpu_nodes`),
    with Ray's token auth off and its sockets under a short folder (`cluster.tmpdir`)."""
    from ray.cluster_utils import Cluster

    tmpdir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    saved = {key: os.environ.get(key) for key in ("RAY_AUTH_MODE", "RAY_TMPDIR")}
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=tmpdir)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 0, "_system_config": FAST_HEALTH_CHECKS, "include_dashboard": False,
    })
    cluster.tmpdir = tmpdir
    try:
        cluster.gpu_nodes = [cluster.add_node(num_cpus=1, num_gpus=gpus_per_node) for _ in range(nodes)]
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def lose_node(cluster: Any, node: Any) -> None:
    """SIGKILL `node` as a lost machine: its Ray processes and every process they started (its
    actors, and what those started), at once.

    Ray's own removal kills the node's Ray processes only; a worker process notices its raylet's
    death a while later and can answer a direct actor call meanwhile, which a lost machine cannot.
    """
    import psutil

    started = psutil.Process(node.all_processes["raylet"][0].process.pid).children(recursive=True)
    cluster.remove_node(node, allow_graceful=False)
    for process in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def remove_node_of(cluster: Any, actor: Any) -> Any:
    """Lose the node whose raylet started `actor` (a psutil process); return it."""
    node = next(n for n in cluster.gpu_nodes if n.all_processes["raylet"][0].process.pid == actor.ppid())
    lose_node(cluster, node)
    cluster.gpu_nodes.remove(node)
    return node


def cached_rows(cache: Path) -> int:
    """Results committed so far to the request cache at `cache` (0 before it exists)."""
    if not cache.exists():
        return 0
    with contextlib.closing(sqlite3.connect(cache)) as conn, contextlib.suppress(sqlite3.Error):
        return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    return 0
