"""Worker groups: data-parallel replicas of tp x pp processes, driven from this process.

A replica is `tp * pp` python processes (`python -m evalfleet.runtime.workers`) joined by
torch.distributed (gloo on CPU, nccl on CUDA) through a TCP store that the driver hosts, so
no port has to be guessed. Rank 0 talks to the driver over an inherited socket pair and
broadcasts each batch to the other ranks (`parallel.serve`). Replicas pull batches from one
shared queue, so a slow replica never holds the others back.

Faults: a rank that dies, or a batch that outlives `batch_timeout`, fails its replica; the
replica is killed and restarted (at most `max_restarts` times) and the batch it had in flight
goes back on the queue. A batch that runs out of memory halves that replica's token budget
and is retried in smaller pieces. No worker outlives the driver: each runs in its own session
(a terminal's Ctrl-C reaches only the driver, which stops them), watches its parent, and the
driver kills every group it started at exit.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalfleet.runtime.backends.base import Item
from evalfleet.runtime.parallel import LOAD_OOM_EXIT, GroupSpec, check_layout
from evalfleet.runtime.runner import BatchCallback, BatchRunner
from evalfleet.runtime.transport import CommunicationCallback, CommunicationSummary
from evalfleet.types import EvalfleetError

_LIVE_GROUPS: weakref.WeakSet[WorkerGroup] = weakref.WeakSet()


class ReplicaFailed(Exception):
    """A rank died or hung: the replica is lost and must be restarted."""


class LoadOutOfMemory(EvalfleetError):
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


class WorkerGroup:
    """The processes of one replica, as the driver sees them."""

    def __init__(
        self, spec: GroupSpec, devices: Sequence[str], name: str = "replica-0", env: dict[str, str] | None = None
    ) -> None:
        if len(devices) != spec.world_size:
            raise ValueError(f"{name} needs {spec.world_size} devices, got {len(devices)}")
        self.spec = spec
        self.devices = list(devices)
        self.name = name
        self.extra_env = dict(env or {})
        self.processes: list[subprocess.Popen[bytes]] = []
        self.info: dict[str, Any] = {}
        self._conn: Any = None
        self._store: Any = None
        self._log_dir = Path(tempfile.mkdtemp(prefix=f"evalfleet-{name}-"))

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def start(self, timeout: float) -> dict[str, Any]:
        """Spawn the ranks and wait until rank 0 says the model is loaded; return what it reported."""
        import torch.distributed as dist

        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        driver_end, worker_end = multiprocessing.Pipe(duplex=True)
        _LIVE_GROUPS.add(self)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _sigterm_to_exit)
        try:
            for rank, device in enumerate(self.devices):
                env = self._environment(rank, device, worker_end.fileno() if rank == 0 else None)
                with open(self._log_dir / f"rank{rank}.log", "wb") as log:
                    self.processes.append(
                        subprocess.Popen(
                            [sys.executable, "-m", "evalfleet.runtime.workers"],
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
        kind, info = self.receive(timeout, "loading the model")
        self.info = info
        return info

    def _environment(self, rank: int, device: str, conn_fd: int | None) -> dict[str, str]:
        env = {**os.environ, **self.extra_env}
        threads = str(self.spec.threads)
        env.update(
            {
                "EVALFLEET_WORKER_SPEC": self.spec.to_json(),
                "EVALFLEET_WORKER_RANK": str(rank),
                "EVALFLEET_STORE_PORT": str(self._store.port),
                "RANK": str(rank),
                "LOCAL_RANK": "0",
                "WORLD_SIZE": str(self.spec.world_size),
                "OMP_NUM_THREADS": threads,
                "MKL_NUM_THREADS": threads,
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1",
                # One GPU per rank: the rank sees it as cuda:0. A CPU rank sees none.
                "CUDA_VISIBLE_DEVICES": device.split(":", 1)[1] if device.startswith("cuda:") else "",
            }
        )
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
                pass  # rank 0 died: the loop below says which way
            for rank, process in enumerate(self.processes):
                code = process.poll()
                if code is not None:
                    self._fail_on_exit(rank, code, doing)
            if time.monotonic() > deadline:
                raise ReplicaFailed(f"{self.name}: no answer within {timeout:g} s while {doing}")

    def _fail_on_exit(self, rank: int, code: int, doing: str) -> None:
        detail = _last_line(self._log_dir / f"rank{rank}.log")
        if code == LOAD_OOM_EXIT:
            raise LoadOutOfMemory(f"{self.name} ran out of memory loading the model on {self.devices[rank]}")
        if doing == "loading the model" and code > 0:
            raise EvalfleetError(f"rank {rank} of {self.name} failed while loading the model: {detail}")
        reason = f"signal {-code}" if code < 0 else f"exit code {code}"
        raise ReplicaFailed(f"rank {rank} of {self.name} stopped ({reason}) while {doing}: {detail}")

    def stop(self, grace: float = 5.0) -> None:
        """Ask the ranks to finish, then kill whatever is still running after `grace` seconds."""
        if self._conn is not None and all(process.poll() is None for process in self.processes):
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
        for log in self._log_dir.glob("*.log"):
            log.unlink(missing_ok=True)
        if self._log_dir.exists():
            self._log_dir.rmdir()


def _padded_tokens(items: Sequence[Item]) -> int:
    return len(items) * max(item.length for item in items)


def _first_chunk(items: Sequence[Item], budget: int | None) -> list[Item]:
    """The longest prefix of `items` whose padded size fits `budget` (at least one item)."""
    if budget is None:
        return list(items)
    count = 1
    while count < len(items) and _padded_tokens(items[: count + 1]) <= budget:
        count += 1
    return list(items[:count])


@dataclass
class _Replica:
    index: int
    devices: list[str]
    group: WorkerGroup | None = None
    token_budget: int | None = None
    restarts: int = 0
    oom_halvings: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"replica-{self.index}"


class WorkerGroupRunner(BatchRunner):
    """Batches computed by `dp` worker groups of `tp * pp` ranks each.

    `replicas` gives each replica's devices, one per rank in rank order ("cpu" or "cuda:N");
    `env` is added to the workers' environment.
    """

    def __init__(
        self,
        spec: GroupSpec,
        replicas: Sequence[Sequence[str]],
        *,
        max_restarts: int = 2,
        batch_timeout: float = 900.0,
        load_timeout: float = 1800.0,
        on_communication: CommunicationCallback | None = None,
        placement: list[list[Any]] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.replicas = [_Replica(i, list(devices)) for i, devices in enumerate(replicas)]
        self.max_restarts = max_restarts
        self.batch_timeout = batch_timeout
        self.load_timeout = load_timeout
        self.on_communication = on_communication
        self.placement = placement
        self.env = dict(env or {})
        self.communication = CommunicationSummary()
        self.load_seconds = 0.0
        self._lock = threading.Lock()
        self._info: dict[str, Any] = {}

    def start(self) -> WorkerGroupRunner:
        """Start every replica at once; on any failure stop them all and raise."""
        check_layout(self.spec)
        began = time.perf_counter()
        errors: list[BaseException] = []

        def start_one(replica: _Replica) -> None:
            try:
                self._start_replica(replica)
            except BaseException as error:  # reported below, in the caller's thread
                errors.append(error)

        threads = [threading.Thread(target=start_one, args=(r,), daemon=True) for r in self.replicas]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        except BaseException:
            self.close()
            raise
        self.load_seconds = time.perf_counter() - began
        if errors:
            self.close()
            error = errors[0]
            if isinstance(error, ReplicaFailed):
                raise EvalfleetError(f"could not start the worker group: {error}") from error
            raise error
        return self

    def _start_replica(self, replica: _Replica) -> None:
        group = WorkerGroup(self.spec, replica.devices, replica.name, self.env)
        replica.group = group
        info = group.start(self.load_timeout)
        with self._lock:
            self._info = self._info or info

    @property
    def info(self) -> dict[str, Any]:
        """Rank 0's report of the first replica: loading path, max length, and every rank's part."""
        return self._info

    @property
    def max_length(self) -> int:
        return int(self._info["max_length"])

    def worker_pids(self) -> list[list[int]]:
        return [replica.group.pids if replica.group else [] for replica in self.replicas]

    def run(self, batches: Sequence[Sequence[Item]], on_batch_done: BatchCallback) -> None:
        todo: queue.Queue[int] = queue.Queue()
        for index in range(len(batches)):
            todo.put(index)
        events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        finished = threading.Event()
        live = [replica for replica in self.replicas if replica.group is not None]
        if batches and not live:
            raise EvalfleetError("no replica of the worker group is running; every one failed earlier")
        threads = [
            threading.Thread(target=self._pull, args=(r, batches, todo, events, finished), daemon=True) for r in live
        ]
        for thread in threads:
            thread.start()
        remaining, lost, clean = len(batches), 0, False
        try:
            while remaining:
                try:
                    kind, *payload = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if kind == "done":
                    on_batch_done(payload[0], payload[1])
                    remaining -= 1
                elif kind == "fatal":
                    raise EvalfleetError(payload[0])
                else:
                    lost += 1
                    if lost == len(threads):
                        raise EvalfleetError(f"every replica failed; last: {payload[0]}")
            clean = True
        finally:
            finished.set()
            if not clean:
                for replica in self.replicas:
                    if replica.group is not None:
                        replica.group.kill()
            for thread in threads:
                thread.join(timeout=30)

    def _pull(
        self,
        replica: _Replica,
        batches: Sequence[Sequence[Item]],
        todo: queue.Queue[int],
        events: queue.Queue[tuple[Any, ...]],
        finished: threading.Event,
    ) -> None:
        """One replica's loop: take a batch, compute it, report it; restart on failure."""
        while not finished.is_set():
            try:
                index = todo.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                events.put(("done", index, self._compute(replica, index, batches[index])))
            except ReplicaFailed as failure:
                todo.put(index)
                if finished.is_set() or not self._restart(replica, str(failure)):
                    events.put(("lost", str(failure)))
                    return
            except EvalfleetError as error:
                events.put(("fatal", str(error)))
                return

    def _compute(self, replica: _Replica, index: int, batch: Sequence[Item]) -> list[Any]:
        """One batch on one replica, in pieces that fit its token budget, halving it on OOM."""
        results: list[Any] = []
        start = 0
        while start < len(batch):
            chunk = _first_chunk(batch[start:], replica.token_budget)
            status, _, values, reports = replica.group.request(("batch", index, chunk), self.batch_timeout)
            self._record(replica, reports)
            if status == "oom":
                if len(chunk) == 1:
                    raise EvalfleetError(
                        f"one request of {chunk[0].length} tokens does not fit in memory on {replica.name}"
                    )
                replica.token_budget = _padded_tokens(chunk) // 2
                replica.oom_halvings += 1
                continue
            results.extend(values)
            start += len(chunk)
        return results

    def _record(self, replica: _Replica, reports: list[dict[str, Any]]) -> None:
        with self._lock:
            self.communication.add_batch(reports)
            if self.on_communication is None:
                return
            for rank, report in enumerate(reports):
                for event in report["events"]:
                    self.on_communication(event["kind"], event["bytes"], event["seconds"], [replica.devices[rank]])

    def _restart(self, replica: _Replica, reason: str) -> bool:
        """Kill the replica and start it again, unless it has used up its restarts."""
        replica.failures.append(reason)
        while replica.restarts < self.max_restarts:
            replica.restarts += 1
            if replica.group is not None:
                replica.group.kill()
            try:
                self._start_replica(replica)
                return True
            except (ReplicaFailed, EvalfleetError) as error:
                replica.failures.append(str(error))
        if replica.group is not None:
            replica.group.kill()
        replica.group = None
        return False

    def describe(self) -> dict[str, Any]:
        tp, pp, dp = self.spec.tp, self.spec.pp, len(self.replicas)
        strategy = "hybrid" if tp > 1 and pp > 1 else "tp" if tp > 1 else "pp" if pp > 1 else "dp" if dp > 1 else "single"
        ranks = self._info.get("ranks", [])
        return {
            "strategy": strategy,
            "tp": tp,
            "pp": pp,
            "dp": dp,
            "devices": [device for replica in self.replicas for device in replica.devices],
            "placement": self.placement or [list(replica.devices) for replica in self.replicas],
            "backend": "hf",
            "dtype": self.spec.dtype,
            "parallel_path": self.spec.path,
            "threads_per_rank": self.spec.threads,
            "load_seconds": round(self.load_seconds, 3),
            "parameters_per_rank": [rank["parameters"] for rank in ranks],
            "parameter_bytes_per_rank": [rank["parameter_bytes"] for rank in ranks],
            "restarts": sum(replica.restarts for replica in self.replicas),
            "oom_halvings": sum(replica.oom_halvings for replica in self.replicas),
            "communication": self.communication.as_dict(),
        }

    def close(self) -> None:
        for replica in self.replicas:
            if replica.group is not None:
                replica.group.stop()
                replica.group = None


def _worker_main() -> None:
    import faulthandler
    from multiprocessing.connection import Connection

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where a hung rank is

    from evalfleet.runtime.parallel import serve

    spec = GroupSpec.from_json(os.environ["EVALFLEET_WORKER_SPEC"])
    rank = int(os.environ["EVALFLEET_WORKER_RANK"])
    fd = os.environ.get("EVALFLEET_DRIVER_FD")
    serve(spec, rank, int(os.environ["EVALFLEET_STORE_PORT"]), Connection(int(fd)) if fd else None)


if __name__ == "__main__":
    _worker_main()
