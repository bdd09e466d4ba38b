"""The worker's side of live elastic data parallelism.

The scheduler decides that a running job grows or gives back a replica (`policy._grow`,
`policy._shrink_for`) and writes the order into the job's row (`JobStore.order_growth`,
`order_shrink`). The job's worker, which owns the worker groups, takes the orders here:
it starts a new replica on the devices it was given, or asks one replica to leave after
its batch in hand; the other replicas keep pulling batches from the same queue all along.
When a replica has left, or failed to join, the worker hands its devices back in the store,
and only then may the scheduler give them to another job.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

from evalfleet.orchestrator.executors.local import THREADS_VARIABLE
from evalfleet.orchestrator.store import Device, JobStore
from evalfleet.types import EvalfleetError

POLL_S = 0.5


def rank_devices(devices: Sequence[Device], env: dict[str, str]) -> list[str]:
    """The device of each rank of a replica started by this worker on pool `devices`.

    A CPU slot is the CPU; GPUs are counted among the replica's own `CUDA_VISIBLE_DEVICES`
    (set in `env`), since the worker itself sees only the GPUs it was launched on.
    """
    if env.get("CUDA_VISIBLE_DEVICES", "") == "":
        return ["cpu"] * len(devices)
    return [f"cuda:{i}" for i in range(len(devices))]


class LiveReplicas:
    """Follows the scheduler's replica orders for one job while its runner runs."""

    def __init__(self, db_path: str | os.PathLike[str], job_id: str, placement: Sequence[Device],
                 replica_gpus: int, *, poll_s: float = POLL_S) -> None:
        self.db_path, self.job_id = db_path, job_id
        self.placement = [tuple(d) for d in placement]
        self.replica_gpus = replica_gpus
        self.poll_s = poll_s
        self._runner: Any = None
        self._names: dict[tuple[Device, ...], str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: JobStore | None = None

    def attach(self, runner: Any) -> None:
        """The engine's hook: a runner about to run (or None once it is done)."""
        if runner is None:
            self.close()
            return
        if not hasattr(runner, "add_replica"):
            return  # this runner cannot change its replicas (the job keeps its width)
        self._runner = runner
        self._store = JobStore(self.db_path)
        size = self.replica_gpus
        chunks = [tuple(self.placement[i:i + size]) for i in range(0, len(self.placement), size)]
        self._names = dict(zip(chunks, runner.replica_names, strict=False))
        try:
            self._store.open_resize(self.job_id, {name: list(devices) for devices, name in self._names.items()},
                                    load_s=round(runner.load_seconds, 3))
        except EvalfleetError:  # cancelled or requeued meanwhile: the job keeps its width and ends soon
            self.close()
            return
        self._thread = threading.Thread(target=self._follow, name="evalfleet-replicas", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                grows, shrinks = self._store.take_orders(self.job_id)
            except EvalfleetError:  # the job is no longer running: nothing more to follow
                return
            except Exception as error:  # a busy store must not kill the job; the next poll retries
                print(f"[evalfleet worker] reading replica orders failed: {error}", file=sys.stderr, flush=True)
                continue
            for order in grows:
                threading.Thread(target=self._add, args=(order,), name="evalfleet-replica-start", daemon=True).start()
            for devices in shrinks:
                self._drop(tuple(devices))

    def _add(self, order: dict[str, Any]) -> None:
        devices = tuple(tuple(d) for d in order["devices"])
        env = dict(order.get("env") or {})
        threads = int(env.pop(THREADS_VARIABLE, "1"))
        try:
            name = self._runner.add_replica(rank_devices(devices, env), env=env, threads=threads)
        except Exception as error:
            self._settle(lambda store: store.replica_left(self.job_id, list(devices),
                                                          f"its new replica failed to start: {error}"))
            return
        with self._lock:
            self._names[devices] = name
        self._settle(lambda store: store.replica_joined(self.job_id, name, list(devices)))

    def _drop(self, devices: tuple[Device, ...]) -> None:
        with self._lock:
            name = self._names.pop(devices, None)
        if name is None:
            self._settle(lambda store: store.replica_kept(self.job_id, list(devices), "no such replica here"))
            return
        try:
            self._runner.retire_replica(name, on_left=lambda: self._settle(
                lambda store: store.replica_left(self.job_id, list(devices), "given back to the pool")))
        except EvalfleetError as error:  # its last replica: the job keeps it
            with self._lock:
                self._names[devices] = name
            self._settle(lambda store: store.replica_kept(self.job_id, list(devices), str(error)))

    def _settle(self, write: Any) -> None:
        """Write a replica's outcome with a connection of its own (these run on several threads)."""
        with JobStore(self.db_path) as store:
            try:
                write(store)
            except EvalfleetError as error:  # the job ended meanwhile: its devices are free anyway
                print(f"[evalfleet worker] {error}", file=sys.stderr, flush=True)
