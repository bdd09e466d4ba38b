"""Worker groups: data-parallel replicas of tp x pp processes, driven from this process.

A replica is `tp * pp` python processes (`python -m evalfleet.runtime.rank`) joined by
torch.distributed (gloo on CPU, nccl on CUDA) through a TCP store that the driver hosts, so
no port has to be guessed. Rank 0 talks to the driver over an inherited socket pair and
broadcasts each batch to the other ranks (`rank.serve`). Replicas pull batches from one
shared queue, so a slow replica never holds the others back.

Faults: a rank that dies, or a batch that outlives `batch_timeout`, fails its replica; the
replica is killed and restarted (at most `max_restarts` times) and the batch it had in flight
goes back on the queue. A batch that runs out of memory halves that replica's token budget
and is retried in smaller pieces. No worker outlives the driver: each runs in its own session
(a terminal's Ctrl-C reaches only the driver, which stops them), watches its parent, and the
driver kills every group it started at exit.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from evalfleet.planning.strategy import ParallelLayout
from evalfleet.runtime.backends.base import Item
from evalfleet.runtime.group import GroupSpec, check_layout
from evalfleet.runtime.runner import BatchCallback, BatchRunner, first_chunk, padded_tokens
from evalfleet.runtime.transport import (
    BatchOutOfMemory,
    CommunicationCallback,
    CommunicationSummary,
    LoadOutOfMemory,
    ReplicaFailed,
    WorkerGroup,
)
from evalfleet.types import EvalfleetError, InfrastructureError, ResourceError

__all__ = ["LoadOutOfMemory", "ReplicaFailed", "WorkerGroup", "WorkerGroupRunner"]

# Communication is timed on one batch in this many (per replica); see benchmarks/communication_timing.py.
COMMUNICATION_SAMPLE_EVERY = 20

# (batch wall seconds, pipeline stage of the rank, seconds the rank was busy): the monitor's record_step.
StepCallback = Callable[[float, int, float], None]
# (replica name, vLLM's engine stats after a batch): the monitor's record_engine_stats.
EngineStatsCallback = Callable[[str, dict[str, float]], None]


@dataclass
class _Replica:
    index: int
    devices: list[str]
    group: WorkerGroup | None = None
    token_budget: int | None = None
    restarts: int = 0
    oom_halvings: int = 0
    oom_restarts: int = 0
    batches: int = 0
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
        on_step: StepCallback | None = None,
        placement: list[list[Any]] | None = None,
        env: dict[str, str] | None = None,
        time_every: int = COMMUNICATION_SAMPLE_EVERY,
        on_engine_stats: EngineStatsCallback | None = None,
    ) -> None:
        self.spec = spec
        self.on_engine_stats = on_engine_stats
        self.replicas = [_Replica(i, list(devices)) for i, devices in enumerate(replicas)]
        self.max_restarts = max_restarts
        self.batch_timeout = batch_timeout
        self.load_timeout = load_timeout
        self.on_communication = on_communication
        self.on_step = on_step
        self.placement = placement
        self.env = dict(env or {})
        self.time_every = max(1, time_every)
        self.communication = CommunicationSummary(sample_every=self.time_every)
        self.load_seconds = 0.0
        self._lock = threading.Lock()
        self._info: dict[str, Any] = {}
        self._closing = False

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
                raise InfrastructureError(f"could not start the worker group: {error}") from error
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

    @property
    def shares_prefixes(self) -> bool:
        return self.spec.share_prefixes

    @property
    def samples(self) -> bool:
        return self.spec.backend == "vllm"

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
            state = "was closed" if self._closing else "has no replica left; every one failed earlier"
            raise InfrastructureError(f"the worker group {state}")
        threads = [
            threading.Thread(target=self._pull, args=(r, batches, todo, events, finished), daemon=True) for r in live
        ]
        for thread in threads:
            thread.start()
        remaining, lost = len(batches), 0
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
                    raise payload[0]
                else:
                    lost += 1
                    if self._closing:
                        raise InfrastructureError("the worker groups were stopped before the job finished")
                    if lost == len(threads):
                        raise InfrastructureError(f"every replica failed; last: {payload[0]}")
        except BaseException as error:
            if not isinstance(error, Exception):  # Ctrl-C or exit: stop at once
                for replica in self.replicas:
                    if replica.group is not None:
                        replica.group.kill()
            raise
        finally:
            # Each replica finishes the batch in hand (bounded by batch_timeout), so none is
            # left talking to its group when the next run starts.
            finished.set()
            for thread in threads:
                thread.join()

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
                if finished.is_set() or self._closing or not self._restart(replica, str(failure)):
                    events.put(("lost", str(failure)))
                    return
            except EvalfleetError as error:
                events.put(("fatal", error))
                return
            except Exception as error:  # a bug must fail the job, not leave it waiting
                events.put(("fatal", EvalfleetError(f"{replica.name} failed: {type(error).__name__}: {error}")))
                return

    def _compute(self, replica: _Replica, index: int, batch: Sequence[Item]) -> list[Any]:
        """One batch on one replica, in pieces that fit its token budget.

        Out of memory halves the replica's budget for the rest of the job; a multi-rank group
        that ran out of memory is restarted first (its ranks have left, see `rank.serve`).
        """
        results: list[Any] = []
        start = 0
        while start < len(batch):
            chunk = first_chunk(batch[start:], replica.token_budget)
            timed = replica.batches % self.time_every == 0
            replica.batches += 1
            began = time.perf_counter()
            try:
                status, _, values, reports = replica.group.request(("batch", index, chunk, timed), self.batch_timeout)
            except BatchOutOfMemory as failure:
                replica.failures.append(str(failure))
                self._halve(replica, chunk)
                replica.oom_restarts += 1
                replica.group.kill()
                self._start_replica(replica)
                continue
            self._record(replica, reports, time.perf_counter() - began)
            if status == "oom":
                self._halve(replica, chunk)
                continue
            results.extend(values)
            start += len(chunk)
        return results

    @staticmethod
    def _halve(replica: _Replica, chunk: Sequence[Item]) -> None:
        if len(chunk) == 1:
            raise ResourceError(f"one request of {chunk[0].length} tokens does not fit in memory on {replica.name}")
        replica.token_budget = padded_tokens(chunk) // 2
        replica.oom_halvings += 1

    def _record(self, replica: _Replica, reports: list[dict[str, Any]], seconds: float) -> None:
        """Keep a batch's traffic; the monitor hears of sampled (timed) batches only, so its
        communication share compares like with like. vLLM's engine stats are totals so far, kept
        from every batch."""
        with self._lock:
            self.communication.add_batch(reports)
            if self.on_engine_stats is not None:
                for report in reports:
                    if "engine" in report:
                        self.on_engine_stats(replica.name, report["engine"])
            if not any(report.get("timed") for report in reports):
                return
            for rank, report in enumerate(reports):
                if self.on_step is not None:
                    self.on_step(seconds, rank // self.spec.tp, report["busy_seconds"])
                if self.on_communication is not None:
                    for event in report["events"]:
                        self.on_communication(event["kind"], event["bytes"], event["seconds"], [replica.devices[rank]])

    def _restart(self, replica: _Replica, reason: str) -> bool:
        """Kill the replica and start it again, unless it has used up its restarts or the runner is closing."""
        replica.failures.append(reason)
        while replica.restarts < self.max_restarts and not self._closing:
            replica.restarts += 1
            if replica.group is not None:
                replica.group.kill()
            try:
                self._start_replica(replica)
            except (ReplicaFailed, EvalfleetError) as error:
                replica.failures.append(str(error))
                continue
            if not self._closing:
                return True
        if replica.group is not None:
            replica.group.kill()
        replica.group = None
        return False

    def describe(self) -> dict[str, Any]:
        return describe_layout(
            self.spec, len(self.replicas), self._info.get("ranks", []), self.load_seconds,
            devices=[device for replica in self.replicas for device in replica.devices],
            placement=self.placement or [list(replica.devices) for replica in self.replicas],
        ) | {
            "restarts": sum(replica.restarts for replica in self.replicas),
            "oom_halvings": sum(replica.oom_halvings for replica in self.replicas),
            "oom_restarts": sum(replica.oom_restarts for replica in self.replicas),
            "token_budgets": [replica.token_budget for replica in self.replicas],
            "communication": self.communication.as_dict(),
            **{key: self._info[key] for key in ("backend_version", "vllm") if key in self._info},
        }

    def close(self, grace: float = 5.0) -> None:
        """Stop every group (killing what is still running after `grace` seconds); a `run` in
        progress in another thread then fails instead of restarting them. Safe to call twice."""
        self._closing = True
        for replica in self.replicas:
            if replica.group is not None:
                replica.group.stop(grace)
                replica.group = None


def describe_layout(spec: GroupSpec, dp: int, ranks: Sequence[dict[str, Any]], load_seconds: float, *,
                    devices: list[Any], placement: list[Any]) -> dict[str, Any]:
    """The layout part of results.json that every runner of worker groups writes, local or on Ray."""
    return {
        "strategy": ParallelLayout(spec.tp, spec.pp, dp).strategy.value,
        "tp": spec.tp,
        "pp": spec.pp,
        "dp": dp,
        "devices": devices,
        "placement": placement,
        "backend": spec.backend,
        "dtype": spec.dtype,
        "parallel_path": spec.path,
        "threads_per_rank": spec.threads,
        "load_seconds": round(load_seconds, 3),
        "parameters_per_rank": [rank["parameters"] for rank in ranks],
        "parameter_bytes_per_rank": [rank["parameter_bytes"] for rank in ranks],
    }
