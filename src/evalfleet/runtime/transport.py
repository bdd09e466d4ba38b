"""Driver side: how the driver reaches a worker group's processes, and what their traffic cost.

`WorkerGroup` is the driver's handle on one replica: it spawns the ranks (each in its own
session, one GPU or one CPU thread budget each), hosts the TCP store they rendezvous on (so
no port has to be guessed), talks to rank 0 over an inherited socket pair, notices a dead or
silent rank, and kills them all. Rank 0 relays each message to its group over a gloo
"control" group (`rank.serve`). The ranks' own traffic, timed by `timing.CommunicationTimer`,
comes back with each batch and adds up in `CommunicationSummary`.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalfleet.runtime.group import BATCH_OOM_EXIT, LOAD_OOM_EXIT, GroupSpec
from evalfleet.types import EvalfleetError, ResourceError

# (kind, bytes, seconds, devices): MultiGPUPerformanceMonitor.record_communication_event's shape.
CommunicationCallback = Callable[[str, int, float, list[str]], None]

@dataclass
class CommunicationSummary:
    """What the driver keeps of every rank's traffic, for results.json and the monitor.

    Only one batch in `sample_every` is timed (timing syncs the device around each collective);
    `share` compares the timed batches' traffic with those batches' own busy time.
    """

    sample_every: int = 1
    seconds: float = 0.0
    bytes: int = 0
    calls: int = 0
    busy_seconds: float = 0.0
    timed_busy_seconds: float = 0.0
    batches: int = 0
    timed_batches: int = 0
    by_kind: dict[str, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0.0]))

    def add_batch(self, per_rank: list[dict[str, Any]]) -> None:
        """`per_rank`: one {"busy_seconds", "events", "timed"} per rank of the group for one batch."""
        if not per_rank:
            return
        self.batches += 1
        timed = any(report.get("timed") for report in per_rank)
        self.timed_batches += timed
        for report in per_rank:
            self.busy_seconds += report["busy_seconds"]
            if timed:
                self.timed_busy_seconds += report["busy_seconds"]
            for event in report["events"]:
                self.seconds += event["seconds"]
                self.bytes += event["bytes"]
                self.calls += event["calls"]
                totals = self.by_kind[event["kind"]]
                totals[0] += event["calls"]
                totals[1] += event["bytes"]
                totals[2] += event["seconds"]

    def as_dict(self) -> dict[str, Any]:
        share = self.seconds / self.timed_busy_seconds if self.timed_busy_seconds > 0 else 0.0
        return {
            "seconds": round(self.seconds, 6),
            "bytes": int(self.bytes),
            "calls": int(self.calls),
            "rank_busy_seconds": round(self.busy_seconds, 6),
            "share": round(min(share, 1.0), 6),
            "sample_every": self.sample_every,
            "batches": self.batches,
            "timed_batches": self.timed_batches,
            "by_kind": {
                kind: {"calls": int(c), "bytes": int(b), "seconds": round(s, 6)}
                for kind, (c, b, s) in sorted(self.by_kind.items())
            },
        }


_LIVE_GROUPS: weakref.WeakSet[WorkerGroup] = weakref.WeakSet()


class ReplicaFailed(Exception):
    """A rank died or hung: the replica is lost and must be restarted."""


class BatchOutOfMemory(ReplicaFailed):
    """A rank of a multi-rank group ran out of memory mid-batch and left; its peers are being
    stopped, and the replica must restart before a smaller batch is tried."""


class LoadOutOfMemory(ResourceError):
    """The model did not fit the devices of a replica; a larger layout may fit."""


def _kill_all_groups() -> None:
    for group in list(_LIVE_GROUPS):
        group.kill()


def _sigterm_to_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


atexit.register(_kill_all_groups)


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def physical_gpus(device: str, env: dict[str, str]) -> list[str]:
    """The GPUs that `device` ("cuda:N", or several joined by commas) names under `env`: each N
    counts among `env`'s CUDA_VISIBLE_DEVICES when it has one, else among all GPUs."""
    indices = [int(name.split(":", 1)[1]) for name in device.split(",")]
    visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return [visible[i] if visible else str(i) for i in indices]


class WorkerGroup:
    """The processes of one replica, as the driver sees them."""

    def __init__(
        self, spec: GroupSpec, devices: Sequence[str], name: str = "replica-0", env: dict[str, str] | None = None,
        python: str = sys.executable,
    ) -> None:
        """`python`: the interpreter of the ranks, another environment's for a vLLM replica on Ray (`ray_vllm`)."""
        if len(devices) != spec.world_size:
            raise ValueError(f"{name} needs {spec.world_size} devices, got {len(devices)}")
        self.spec = spec
        self.python = python
        self.devices = list(devices)
        self.name = name
        self.extra_env = dict(env or {})
        self.processes: list[subprocess.Popen[bytes]] = []
        self.info: dict[str, Any] = {}
        self._conn: Any = None
        self._store: Any = None
        self._log_dir: Path | None = None

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def start(self, timeout: float) -> dict[str, Any]:
        """Spawn the ranks and wait until rank 0 says the model is loaded; return what it reported."""
        import torch.distributed as dist

        _LIVE_GROUPS.add(self)
        self._log_dir = Path(tempfile.mkdtemp(prefix=f"evalfleet-{self.name}-"))
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        driver_end, worker_end = multiprocessing.Pipe(duplex=True)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _sigterm_to_exit)
        try:
            # A vLLM replica is one process over all its devices; vLLM starts its own ranks.
            per_process = self.devices if self.spec.processes == len(self.devices) else [",".join(self.devices)]
            for rank, device in enumerate(per_process):
                env = self._environment(rank, device, worker_end.fileno() if rank == 0 else None)
                with open(self._log_dir / f"rank{rank}.log", "wb") as log:
                    self.processes.append(
                        subprocess.Popen(
                            [self.python, "-m", "evalfleet.runtime.rank"],
                            env=env,
                            stdin=subprocess.DEVNULL,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            pass_fds=(worker_end.fileno(),) if rank == 0 else (),
                            start_new_session=True,
                        )
                    )
        finally:
            worker_end.close()
        self._conn = driver_end
        _, info = self.receive(timeout, "loading the model")
        self.info = info
        return info

    def _environment(self, rank: int, device: str, conn_fd: int | None) -> dict[str, str]:
        env = {**os.environ, **self.extra_env}
        if self.python != sys.executable:  # another environment's Python finds its own packages
            for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
                env.pop(name, None)
        threads = str(self.spec.threads)
        env.update(
            {
                "EVALFLEET_WORKER_SPEC": self.spec.to_json(),
                "EVALFLEET_WORKER_RANK": str(rank),
                "EVALFLEET_STORE_PORT": str(self._store.port),
                "EVALFLEET_REPLICA": self.name.rsplit("-", 1)[-1],
                "RANK": str(rank),
                "LOCAL_RANK": "0",
                "WORLD_SIZE": str(self.spec.world_size),
                "OMP_NUM_THREADS": threads,
                "MKL_NUM_THREADS": threads,
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1",
            }
        )
        # One GPU per rank, which the rank sees as cuda:0; a CPU rank sees none. "cuda:N" counts
        # among the GPUs this group may use: its own CUDA_VISIBLE_DEVICES (a replica added on GPUs
        # the driver does not see), else the driver's; in PCI order as NVML does.
        if device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = ",".join(physical_gpus(device, env))
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        elif device.startswith("cpu"):
            env["CUDA_VISIBLE_DEVICES"] = ""
        if conn_fd is not None:
            env["EVALFLEET_DRIVER_FD"] = str(conn_fd)
        return env

    def request(self, message: tuple[Any, ...], timeout: float) -> tuple[Any, ...]:
        try:
            self._conn.send(message)
        except (OSError, EOFError) as error:
            raise ReplicaFailed(f"{self.name}: rank 0 is gone ({error})") from None
        return self.receive(timeout, f"batch {message[1]}")

    def receive(self, timeout: float, doing: str) -> tuple[Any, ...]:
        """Rank 0's next message; ReplicaFailed as soon as a rank dies, or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._conn.poll(0.2):
                    return self._conn.recv()
            except (OSError, EOFError):
                time.sleep(0.05)  # rank 0 is gone or going: the exit code below says how
            codes = {rank: process.poll() for rank, process in enumerate(self.processes)}
            exited = {rank: code for rank, code in codes.items() if code is not None}
            if exited:
                # The first rank to fail takes its peers down with it: report the cause, not the echo.
                causes = [rank for rank, code in exited.items() if code in (LOAD_OOM_EXIT, BATCH_OOM_EXIT)]
                rank = causes[0] if causes else min(exited)
                self._fail_on_exit(rank, exited[rank], doing)
            if time.monotonic() > deadline:
                raise ReplicaFailed(f"{self.name}: no answer within {timeout:g} s while {doing}")

    def _fail_on_exit(self, rank: int, code: int, doing: str) -> None:
        detail = _last_line(self._log_dir / f"rank{rank}.log") if self._log_dir else ""
        if code == LOAD_OOM_EXIT:
            raise LoadOutOfMemory(f"{self.name} ran out of memory loading the model on {self.devices[rank]}")
        if code == BATCH_OOM_EXIT:
            raise BatchOutOfMemory(f"rank {rank} of {self.name} ran out of memory while {doing}")
        if doing == "loading the model" and code > 0:
            raise EvalfleetError(f"rank {rank} of {self.name} failed while loading the model: {detail}")
        reason = f"signal {-code}" if code < 0 else f"exit code {code}"
        raise ReplicaFailed(f"rank {rank} of {self.name} stopped ({reason}) while {doing}: {detail}")

    def stop(self, grace: float = 5.0) -> None:
        """Ask the ranks to finish, then kill whatever is still running after `grace` seconds
        (at once with no grace, which is also safe while another thread is mid-request)."""
        if grace > 0 and self._conn is not None and all(process.poll() is None for process in self.processes):
            try:
                self._conn.send(("stop",))
            except (OSError, EOFError):
                pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(process.poll() is None for process in self.processes):
                time.sleep(0.05)
        self.kill()

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    process.kill()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._store = None
        _LIVE_GROUPS.discard(self)
        if self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
