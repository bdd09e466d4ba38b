"""Rank side: one worker process of a group, from joining the group to its last batch.

Started by the driver as `python -m evalfleet.runtime.rank` (see `transport.WorkerGroup`).
Rank 0 takes each message from the driver over an inherited pipe and broadcasts it to the
other ranks over a separate gloo "control" group; every rank loads its part of the model
(`parallel.load_part`) and computes each batch.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from evalfleet.runtime.group import BATCH_OOM_EXIT, GroupSpec
from evalfleet.runtime.parallel import call_counts, call_report, load_part, rank_report
from evalfleet.runtime.rank_process import exit_with_parent, load_or_exit
from evalfleet.runtime.runner import compute, out_of_memory
from evalfleet.runtime.timing import CommunicationTimer

COLLECTIVE_TIMEOUT = timedelta(minutes=30)
IDLE_TIMEOUT = timedelta(days=7)  # ranks other than 0 wait this long for the next message


def _join_group(spec: GroupSpec, rank: int, store_port: int) -> Any:
    """Join the replica's process group; return the gloo group that carries the driver's messages."""
    on_gpu = spec.device.startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(0)
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    dist.init_process_group(
        "nccl" if on_gpu else "gloo",
        store=store,
        rank=rank,
        world_size=spec.world_size,
        timeout=COLLECTIVE_TIMEOUT,
        device_id=torch.device("cuda", 0) if on_gpu else None,
    )
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


class _Control:
    """Rank 0 hears the driver and tells the others; the others only follow."""

    def __init__(self, rank: int, world_size: int, group: Any, conn: Connection | None) -> None:
        self.rank, self.world_size, self.group, self.conn = rank, world_size, group, conn

    def next_message(self) -> Any:
        message = [self.conn.recv() if self.rank == 0 else None]
        if self.world_size > 1:
            c10d.broadcast_object_list(message, src=0, group=self.group)
        return message[0]

    def gather(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        c10d.gather_object(value, gathered, dst=0, group=self.group)
        return gathered or []

    def reply(self, message: Any) -> None:
        if self.rank == 0:
            self.conn.send(message)


def serve(spec: GroupSpec, rank: int, store_port: int, conn: Connection | None) -> None:
    """A worker's life: join the group, load its part, then compute batches until told to stop."""
    spec = spec.on_this_device()
    torch.set_num_threads(spec.threads)
    exit_with_parent()
    group = _join_group(spec, rank, store_port) if spec.processes > 1 else None
    control = _Control(rank, spec.processes, group, conn)
    started = time.perf_counter()
    part = load_or_exit(lambda: load_part(spec))
    on_gpu = part.backend.device.type == "cuda"
    timer = CommunicationTimer(torch.cuda.synchronize if on_gpu else None)
    report = rank_report(part, rank) | {"load_seconds": time.perf_counter() - started}
    reports = control.gather(report)
    control.reply(("ready", {"path": spec.path, "max_length": part.backend.max_length, "ranks": reports}))
    while (message := control.next_message())[0] == "batch":
        _, index, items, timed, *rest = message  # rest: generation batches merged, decoded as one stream
        # Timing adds device syncs to every collective, so only the batches the driver samples pay for it.
        timed = timed and spec.time_communication and spec.processes > 1
        if timed:
            timer.install()
        began, counts = time.perf_counter(), call_counts(part.backend)
        status, results = "done", None
        try:
            results = compute(part.backend, items, rest[0] if rest else None)
        except Exception as error:
            if not out_of_memory(error):
                raise
            if spec.processes > 1:
                # Peers may wait in a collective this rank will never join, so the group cannot
                # agree on anything: leave at once, and the driver restarts the group.
                print(f"out of memory in batch {index}", file=sys.stderr, flush=True)
                os._exit(BATCH_OOM_EXIT)
            status = "oom"
            if on_gpu:
                torch.cuda.empty_cache()
        finally:
            timer.uninstall()
        busy = time.perf_counter() - began
        reports = control.gather({"busy_seconds": busy, "events": timer.take(), "timed": timed,
                                  **call_report(part.backend, counts)})
        control.reply((status, index, results if status == "done" else None, reports))
    if group is not None:
        dist.destroy_process_group()


def main() -> None:
    import faulthandler

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where a hung rank is
    spec = GroupSpec.from_json(os.environ["EVALFLEET_WORKER_SPEC"])
    rank = int(os.environ["EVALFLEET_WORKER_RANK"])
    fd = os.environ.get("EVALFLEET_DRIVER_FD")
    if spec.backend == "vllm":  # one process per replica: vLLM starts and talks to its own ranks
        from evalfleet.runtime.vllm_worker import serve as serve_vllm

        serve_vllm(spec, Connection(int(fd)))
        return
    serve(spec, rank, int(os.environ["EVALFLEET_STORE_PORT"]), Connection(int(fd)) if fd else None)


if __name__ == "__main__":
    main()
