"""Run each job's ranks as Ray actors on a Ray cluster, the cluster being the pool.

Per job, a driver process (`evalfleet worker`, as with the local executor) runs on the
scheduler's machine: it runs lm-eval, commits each finished request to the scheduler's request
cache, writes results.json next to the store, and reports progress, so the cluster's nodes need
no shared filesystem. Its ranks are Ray actors in one placement group, each bundle pinned to the
node the policy chose. Ray ties the group and the actors to the driver: when the driver ends,
however it ends, Ray removes them, so no actor outlives its job and a restarted scheduler that
reattaches to a live driver never starts a second set.

A node that dies takes its ranks with it; a job's replicas on other nodes finish the job without
them (`RayGroupRunner`). A job left with none: the driver exits with `NodeLost`'s code, and the
scheduler requeues the job at once (no backoff, no blame on devices) to resume from the cache
on the nodes that remain. `current_pool` follows the cluster: a dead node's GPUs leave the pool,
a node that joins is used; the scheduler reads it every round, after collecting exits and right
before placing, so no placement names a node Ray has declared dead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from evalfleet.orchestrator.executors.local import QUIET, THREADS_VARIABLE, worker_command
from evalfleet.orchestrator.executors.process import SubprocessExecutor
from evalfleet.orchestrator.ray_pool import inventory_from_ray
from evalfleet.orchestrator.store import Device, JobRecord
from evalfleet.planning import Inventory

ADDRESS_VARIABLE = "EVALFLEET_RAY_ADDRESS"
NODES_VARIABLE = "EVALFLEET_RAY_NODES"


class RayExecutor(SubprocessExecutor):
    """A driver process per job on this machine; the job's ranks on the Ray cluster at `address`."""

    name = "ray"
    self_reporting = True

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        address: str,
        *,
        order: Sequence[str] = (),
        log_dir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        grace_s: float = 10.0,
        standby: bool = False,
    ) -> None:
        from evalfleet.runtime.ray_ranks import connect

        db = Path(db_path).expanduser().resolve()
        self.address = address
        connect(address)
        self.order = list(order)
        super().__init__(lambda job, placement: worker_command(job.id, db), log_dir=log_dir or db.parent / "logs",
                         env=env, set_visible_devices=False, grace_s=grace_s, standby=standby)

    def current_pool(self) -> Inventory:
        import ray

        inventory, self.order = inventory_from_ray(ray.nodes(), self.order)
        return inventory

    def standby_env(self) -> dict[str, str]:
        """A driver's environment without its job: a standby joins the cluster before it has one."""
        return {**super().standby_env(), **self._driver_env()}

    def job_env(self, job: JobRecord, placement: Sequence[Device]) -> dict[str, str]:
        env = super().job_env(job, placement)
        env.update({NODES_VARIABLE: json.dumps([self.order[node] for node, _ in placement]), **self._driver_env()})
        return env

    def _driver_env(self) -> dict[str, str]:
        # the driver computes nothing; its ranks hold the GPUs
        return {ADDRESS_VARIABLE: self.address, "CUDA_VISIBLE_DEVICES": "", THREADS_VARIABLE: "1",
                "OMP_NUM_THREADS": "1", **QUIET}


def ray_pool_and_executor(address: str, db_path: str | os.PathLike[str], **options: object) -> tuple[Inventory, RayExecutor]:
    """The pool and executor for a scheduler (or a service) on the Ray cluster at `address`.

    The node order continues the one recorded in the store, so placements of jobs launched by
    an earlier scheduler keep naming the same nodes.
    """
    from evalfleet.orchestrator.ray_pool import recorded_order
    from evalfleet.orchestrator.store import JobStore

    with JobStore(db_path) as store:
        order = recorded_order(store)
    executor = RayExecutor(db_path, address, order=order, **options)  # type: ignore[arg-type]
    return executor.current_pool(), executor
