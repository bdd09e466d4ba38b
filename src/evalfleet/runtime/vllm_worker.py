"""A data-parallel replica that holds one vLLM engine: one process, pulling batches from the driver.

The driver starts it like any worker group (`WorkerGroup`), but a vLLM replica is a single
process: vLLM runs its own tp x pp workers beneath it on the replica's GPUs. The engine is
loaded once and serves every batch of every request (lm-eval's data-parallel mode builds a
new engine in a Ray task per call). It speaks the workers' protocol: ("ready", info), then one
(status, index, results, reports) per batch, each report carrying vLLM's engine stats.
"""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection
from typing import Any

from evalfleet.runtime.backends.base import OutOfMemory
from evalfleet.runtime.group import GroupSpec
from evalfleet.runtime.rank_process import exit_with_parent, load_or_exit
from evalfleet.runtime.runner import compute

# torch.distributed's launcher variables, which the driver sets for transformers ranks; vLLM
# would take them as its own world.
_LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def cpu_binding(replica: int, world_size: int, threads: int, cores: list[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for one replica: `threads` cores per vLLM rank, ranks split by '|'.

    Replicas take consecutive cores, so two engines on one machine never share one.
    """
    first = replica * world_size * threads
    ranks = []
    for rank in range(world_size):
        mine = [cores[(first + rank * threads + i) % len(cores)] for i in range(threads)]
        ranks.append(",".join(map(str, mine)))
    return "|".join(ranks)


def prepare_environment(spec: GroupSpec) -> None:
    for name in _LAUNCHER_VARIABLES:
        os.environ.pop(name, None)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # The engine core runs in this process (vLLM would start another), so it dies with the replica.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if spec.device == "cpu" and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        replica = int(os.environ.get("EVALFLEET_REPLICA", "0"))
        cores = sorted(os.sched_getaffinity(0))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(replica, spec.world_size, spec.threads, cores)


def engine_args(spec: GroupSpec) -> dict[str, Any]:
    """The user's extra engine arguments; on the CPU, eager mode unless pipelined: vLLM's compile
    warm-up takes minutes there, longer than a whole evaluation of a small model."""
    args = dict(spec.engine_args)
    if spec.device == "cpu" and spec.pp == 1:
        args.setdefault("enforce_eager", True)
    return args


def load(spec: GroupSpec) -> Any:
    from evalfleet.runtime.backends.vllm import VLLMBackend

    return VLLMBackend.load(
        spec.model_path,
        dtype=spec.dtype,
        device=spec.device,
        tp=spec.tp,
        pp=spec.pp,
        revision=spec.revision,
        trust_remote_code=spec.trust_remote_code,
        max_length=spec.max_length,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        seed=spec.seed,
        engine_args=engine_args(spec),
    )


def weights_report(spec: GroupSpec, dtype_bytes: int) -> dict[str, Any]:
    """Parameters as the checkpoint's safetensors headers count them (vLLM keeps its model to itself)."""
    from pathlib import Path

    from safetensors import safe_open

    count = 0
    for path in sorted(Path(spec.model_path).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                numel = 1
                for size in shape:
                    numel *= size
                count += numel
    return {"rank": 0, "stage": 0, "tp_rank": 0, "parameters": count, "parameter_bytes": count * dtype_bytes}


def serve(spec: GroupSpec, conn: Connection) -> None:
    """Load the engine, report, then compute batches until the driver says stop."""
    import psutil
    import torch

    exit_with_parent()
    spec = spec.on_this_device()
    prepare_environment(spec)
    started = time.perf_counter()
    backend = load_or_exit(lambda: load(spec))
    dtype_bytes = torch.empty((), dtype=getattr(torch, spec.dtype)).element_size()
    rank = weights_report(spec, dtype_bytes) | {
        "dtype": spec.dtype,
        "dtype": spec.dtype,
        "device_name": torch.cuda.get_device_name() if spec.device == "cuda" else "cpu",
        "memory_bytes": psutil.Process().memory_info().rss,
        "load_seconds": time.perf_counter() - started,
    }
    info = {"path": spec.path, "max_length": backend.max_length, "ranks": [rank], **backend.describe()}
    conn.send(("ready", info))
    while (message := conn.recv())[0] == "batch":
        _, index, items, _timed = message  # nothing to time: vLLM's ranks talk among themselves
        began = time.perf_counter()
        status, results = "done", None
        try:
            results = compute(backend, items)
        except OutOfMemory:
            status = "oom"
        report = {
            "busy_seconds": time.perf_counter() - began,
            "events": [],
            "timed": False,
            "engine": backend.engine_stats(),
        }
        conn.send((status, index, results, [report]))
    backend.close()
