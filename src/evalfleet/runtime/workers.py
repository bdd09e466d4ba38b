"""Worker groups: data-parallel replicas of tp x pp processes, driven from this process.

A replica is `tp * pp` python processes (`python -m evalfleet.runtime.rank`) joined by
torch.distributed (gloo on CPU, nccl on CUDA) through a TCP store that the driver hosts, so
no port has to be guessed. Rank 0 talks to the driver over an inherited socket pair and
broadcasts each batch to the other ranks (`rank.serve`). Replicas pull batches from one
shared queue, so a slow replica never holds the others back.

Replicas can join and leave a run in progress: `add_replica` loads a new one (on devices, an
environment and a thread count of its own) and sets it pulling from the running job's queue;
`retire_replica` lets one finish the batch in hand and then stops it. A job never drops to zero
replicas that way, and a retired replica does not count as a failed one.

Faults: a rank that dies, or a batch that outlives `batch_timeout`, fails its replica; the
replica is killed and restarted (at most `max_restarts` times) and the batch it had in flight
goes back on the queue. A restart that raises anything (no space for a temporary folder, no
process slot) is a failed restart, and a replica with no restart left stops pulling, so the
run fails once no replica is left instead of waiting. A batch that has crashed replicas on
two different devices is a poison batch (`PoisonBatch`): the run fails at once as
deterministic, since the batch, not the hardware, is at fault. A batch that runs out of
memory halves that replica's token budget and is retried in smaller pieces. No worker
outlives the driver: each runs in its own session (a terminal's Ctrl-C reaches only the
driver, which stops them), watches its parent, and the driver kills every group it started
at exit.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from evalfleet.planning.strategy import ParallelLayout
from evalfleet.runtime.backends.base import GenerationItem, Item
from evalfleet.runtime.group import GroupSpec, check_layout
from evalfleet.runtime.batching import MAX_ROWS
from evalfleet.runtime.runner import BatchCallback, BatchRunner, first_chunk, halved_budget, padded_tokens
from evalfleet.runtime.transport import (
    BatchOutOfMemory,
    CommunicationCallback,
    CommunicationSummary,
    LoadOutOfMemory,
    ReplicaFailed,
    WorkerGroup,
    physical_gpus,
)
from evalfleet.types import EvalfleetError, InfrastructureError

__all__ = ["LoadOutOfMemory", "PoisonBatch", "ReplicaFailed", "WorkerGroup", "WorkerGroupRunner"]

BATCH_TIMEOUT_S = 900.0
"""How long a replica may take over one batch before it counts as failed (local groups and Ray alike)."""

# Generation batches go to a replica that schedules its own rows merged: a vLLM engine, or an hf
# rank that batches continuously (decoding the merged batches as one stream, newcomers taking the
# places of rows that stopped); up to this many requests a call and at least two calls per replica
# (so replicas share the work and a lost call costs at most half a replica's share); a merged call
# may take its batches' timeouts together.
SCHEDULED_ROWS = 1024

# Communication is timed on one batch in this many (per replica); see benchmarks/communication_timing.py.
COMMUNICATION_SAMPLE_EVERY = 20

# (batch wall seconds, pipeline stage of the rank, seconds the rank was busy): the monitor's record_step.
StepCallback = Callable[[float, int, float], None]
# (replica name, vLLM's engine stats after a batch): the monitor's record_engine_stats.
EngineStatsCallback = Callable[[str, dict[str, float]], None]


class PoisonBatch(EvalfleetError):
    """One batch crashed replicas on two different devices: the batch is at fault, not the hardware,
    so the job fails without a retry and without blaming any device (`failures.exit_report`)."""

    failure = "deterministic"

    def __init__(self, index: int, first: Item, replicas: Sequence[str]) -> None:
        self.index, self.first, self.replicas = index, first, list(replicas)
        super().__init__(f"batch {index} crashed {' and '.join(self.replicas)} on different devices, so the batch "
                         f"itself is at fault: its first request is {describe_item(first)}")


def describe_item(item: Item) -> str:
    """A request as a runner knows it (token ids, no task or document): its kind, size and first tokens."""
    head = ", ".join(map(str, item.context[:8])) + (", ..." if len(item.context) > 8 else "")
    if isinstance(item, GenerationItem):
        return (f"a generation request of {len(item.context)} context tokens and up to {item.max_new_tokens} new "
                f"ones (context {head})")
    return (f"a log-likelihood request of {len(item.context)} context and {len(item.continuation)} continuation "
            f"tokens (context {head})")


class _NotRestarted(ReplicaFailed):
    """A replica that ran out of memory could not start again: its batch did not crash it."""


@dataclass
class _Replica:
    index: int
    devices: list[str]
    # Its own, so a replica added with other threads or another environment restarts the same way.
    spec: GroupSpec
    env: dict[str, str]
    group: WorkerGroup | None = None
    token_budget: int | None = None
    restarts: int = 0
    oom_halvings: int = 0
    oom_restarts: int = 0
    requests: int = 0  # sent to rank 0, pieces of batches included: one in `time_every` is timed
    batches: int = 0  # computed and reported
    failures: list[str] = field(default_factory=list)
    decode: tuple[int, int] = (0, 0)  # its ranks' continuous batching: decode steps, rows decoded
    pulling: bool = False  # a puller of the run in progress drives it
    leaving: bool = False  # retired: takes no further batch, then stops
    on_left: Callable[[], None] | None = None

    @property
    def name(self) -> str:
        return f"replica-{self.index}"

    @property
    def live(self) -> bool:
        return self.group is not None and not self.leaving

    @property
    def hardware(self) -> frozenset[str]:
        """What a crash of this replica could blame: its GPUs. A CPU rank counts as its replica's own
        device, since no CPU is quarantined and each replica's processes are its own."""
        gpus = [gpu for device in self.devices if device.startswith("cuda:")
                for gpu in physical_gpus(device, {**os.environ, **self.env})]
        return frozenset(f"GPU {gpu}" for gpu in gpus) or frozenset({f"the CPU of {self.name}"})


@dataclass
class _Run:
    """What the pullers of one `run` share. It sits on the runner while the run is in progress,
    so that a replica added meanwhile can join it."""

    batches: Sequence[Sequence[Item]]
    weights: Sequence[int] = ()  # per batch, the batches merged into it (its timeout's multiple); 1 when empty
    streams: Sequence[dict[str, int] | None] = ()  # per batch, an hf rank's stream limits where merged
    todo: queue.Queue[int] = field(default_factory=queue.Queue)
    events: queue.Queue[tuple[Any, ...]] = field(default_factory=queue.Queue)
    finished: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    pullers: int = 0  # still pulling: the run fails when none is left, not when each has failed once
    crashed: dict[int, dict[str, frozenset[str]]] = field(default_factory=dict)
    """Per batch index, the replicas that crashed computing it and their devices (`_Replica.hardware`)."""


class WorkerGroupRunner(BatchRunner):
    """Batches computed by `dp` worker groups of `tp * pp` ranks each.

    `replicas` gives each replica's devices, one per rank in rank order ("cpu" or "cuda:N");
    `env` is added to the workers' environment. `add_replica` and `retire_replica` change the
    replicas, during a run or between runs.
    """

    def __init__(
        self,
        spec: GroupSpec,
        replicas: Sequence[Sequence[str]],
        *,
        max_restarts: int = 2,
        batch_timeout: float = BATCH_TIMEOUT_S,
        load_timeout: float = 1800.0,
        on_communication: CommunicationCallback | None = None,
        on_step: StepCallback | None = None,
        placement: list[list[Any]] | None = None,
        env: dict[str, str] | None = None,
        time_every: int = COMMUNICATION_SAMPLE_EVERY,
        on_engine_stats: EngineStatsCallback | None = None,
    ) -> None:
        self.spec = spec
        self.env = dict(env or {})
        self.on_engine_stats = on_engine_stats
        self.replicas = [_Replica(i, list(devices), spec, self.env) for i, devices in enumerate(replicas)]
        self._initial_dp = len(self.replicas)  # what describe() calls dp, however many join or leave
        self.max_restarts = max_restarts
        self.batch_timeout = batch_timeout
        self.load_timeout = load_timeout
        self.on_communication = on_communication
        self.on_step = on_step
        self.placement = placement
        self.time_every = max(1, time_every)
        self.communication = CommunicationSummary(sample_every=self.time_every)
        self.load_seconds = 0.0
        self._lock = threading.Lock()
        self._info: dict[str, Any] = {}
        self._closing = False
        self._run: _Run | None = None
        self._next_index = len(self.replicas)
        self._started = time.perf_counter()
        self._changes: list[dict[str, Any]] = []
        self.on_new_pids: Callable[[list[int]], None] | None = None
        """Told the worker pids of each replica added by `add_replica` (the monitor watches them too)."""

    def start(self) -> WorkerGroupRunner:
        """Start every replica at once; on any failure stop them all and raise."""
        check_layout(self.spec)
        began = self._started = time.perf_counter()
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
            raise _start_error(errors[0])
        return self

    def add_replica(
        self, devices: Sequence[str], *, env: dict[str, str] | None = None, threads: int | None = None
    ) -> str:
        """Start one more replica on `devices` and return its name; blocks while it loads the model.

        `env` is added to the runner's for this replica's ranks only (say, the
        CUDA_VISIBLE_DEVICES of GPUs this process does not see); `threads` replaces the spec's.
        A run in progress gets the new replica at once, so a job can grow while it runs.
        If the replica cannot start, whatever it started is stopped and the runner is left as it was.
        """
        spec = self.spec if threads is None else dataclasses.replace(self.spec, threads=threads)
        with self._lock:
            if self._closing:
                raise InfrastructureError("the worker group was closed; no replica can join it")
            replica = _Replica(self._next_index, list(devices), spec, {**self.env, **(env or {})})
            self._next_index += 1
        try:
            self._start_replica(replica)
        except BaseException as error:
            self._discard(replica)
            raise _start_error(error)
        with self._lock:
            if not self._closing:
                self.replicas.append(replica)
                self._note_change(replica, "added")
                if self._run is not None:
                    self._join(self._run, replica)
                if self.on_new_pids is not None:
                    self.on_new_pids(replica.group.pids)
                return replica.name
        self._discard(replica)
        raise InfrastructureError(f"the worker group was closed while {replica.name} was loading the model")

    def _discard(self, replica: _Replica) -> None:
        """Undo a replica that never joined: stop its ranks, and give back its index if no later one took the next."""
        if replica.group is not None:
            replica.group.kill()
        with self._lock:
            if self._next_index == replica.index + 1:
                self._next_index = replica.index

    def retire_replica(self, name: str, on_left: Callable[[], None] | None = None) -> None:
        """Let replica `name` finish the batch in hand (its results count), take no other, stop its
        group and call `on_left`: from its puller's thread during a run, before returning otherwise.

        Refused for an unknown name, a replica already leaving, and the last live one, so that a
        job shrinks this way but never stops: `close` does that.
        """
        with self._lock:
            replica = self._retirable(name)
            replica.leaving = True
            replica.on_left = on_left
            now = not replica.pulling
        if now:
            self._leave(replica)

    def _retirable(self, name: str) -> _Replica:
        replica = next((r for r in self.replicas if r.name == name), None)
        if replica is None:
            raise EvalfleetError(f"there is no replica named {name!r}; the live ones are {self.replica_names}")
        if replica.leaving:
            raise EvalfleetError(f"{name} is already leaving the job")
        if replica.group is None:
            raise EvalfleetError(f"{name} is not running: it failed or the worker group was closed")
        if not any(other.live for other in self.replicas if other is not replica):
            raise EvalfleetError(f"{name} is the job's last live replica; close the runner to stop the job instead")
        return replica

    def _leave(self, replica: _Replica) -> None:
        """Stop a retired replica, note when it left, and tell whoever retired it."""
        group, replica.group = replica.group, None
        if group is not None:
            group.stop()
        with self._lock:
            self._note_change(replica, "retired")
        if replica.on_left is not None:
            replica.on_left()

    def _note_change(self, replica: _Replica, change: str) -> None:
        """For results.json (under the lock): when the set of replicas changed, and how."""
        self._changes.append({
            "at_s": round(time.perf_counter() - self._started, 3),
            "change": change,
            "replica": replica.name,
            "devices": list(replica.devices),
        })

    def _start_replica(self, replica: _Replica) -> None:
        group = WorkerGroup(replica.spec, replica.devices, replica.name, replica.env)
        replica.group = group
        info = group.start(self.load_timeout)
        with self._lock:
            loaded_dtype([*self._info.get("ranks", []), *info["ranks"]], self.spec.dtype)  # one dtype for all
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
    def replica_names(self) -> list[str]:
        """The replicas that compute batches now: neither retired nor failed, in index order."""
        return [replica.name for replica in sorted(self.replicas, key=lambda r: r.index) if replica.live]

    def worker_pids(self) -> list[list[int]]:
        return [replica.group.pids if replica.group else [] for replica in self.replicas]

    def run(self, batches: Sequence[Sequence[Item]], on_batch_done: BatchCallback) -> None:
        spans = self._merged_spans(batches)
        if spans is None:
            self._run_batches(_Run(batches), on_batch_done)
            return
        merged = Merged(batches, spans, streams=self.spec.backend != "vllm", rows=self.generation_rows)
        self._run_batches(_Run(merged.batches, merged.weights, merged.streams), merged.reporting(on_batch_done))

    def _merged_spans(self, batches: Sequence[Sequence[Item]]) -> list[tuple[int, int]] | None:
        """See `merged_spans`; None where batches go one by one."""
        with self._lock:
            live = max(1, sum(replica.live for replica in self.replicas))
        return merged_spans(batches, live, self.spec, self._info.get("ranks", []))

    def _run_batches(self, run: _Run, on_batch_done: BatchCallback) -> None:
        batches = run.batches
        for index in range(len(batches)):
            run.todo.put(index)
        with self._lock:
            live = [replica for replica in self.replicas if replica.live]
            if batches and not live:
                state = "was closed" if self._closing else "has no replica left; every one failed earlier"
                raise InfrastructureError(f"the worker group {state}")
            self._run = run
            for replica in live:
                self._join(run, replica)
        remaining, failure = len(batches), ""
        try:
            while remaining:
                try:
                    kind, *payload = run.events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if kind == "done":
                    on_batch_done(payload[0], payload[1])
                    remaining -= 1
                elif kind == "fatal":
                    raise payload[0]
                else:  # a puller ended: its replica was lost, or retired
                    if kind == "lost":
                        failure = payload[0]
                        if self._closing:
                            raise InfrastructureError("the worker groups were stopped before the job finished")
                    with self._lock:
                        if not run.pullers:
                            raise InfrastructureError(f"every replica failed; last: {failure}")
        except BaseException as error:
            if not isinstance(error, Exception):  # Ctrl-C or exit: stop at once
                for replica in self.replicas:
                    if replica.group is not None:
                        replica.group.kill()
            raise
        finally:
            # Each replica finishes the batch in hand (bounded by batch_timeout), so none is
            # left talking to its group when the next run starts.
            with self._lock:
                self._run = None  # no replica added from now on joins this run
            run.finished.set()
            for thread in run.threads:
                thread.join()

    def _join(self, run: _Run, replica: _Replica) -> None:
        """Set `replica` pulling from `run` (under the lock, so the count of pullers stays right)."""
        thread = threading.Thread(target=self._pull, args=(replica, run), daemon=True)
        run.threads.append(thread)
        run.pullers += 1
        replica.pulling = True
        thread.start()

    def _pull(self, replica: _Replica, run: _Run) -> None:
        """One replica's puller: its batches, then, if it was retired, its leaving. However it ends,
        it is counted out and `run` hears of it, so a run never waits for a puller that is gone."""
        ending: tuple[Any, ...] | None = ("lost", f"{replica.name} stopped pulling")
        try:
            ending = self._pull_batches(replica, run)
        except Exception as error:  # the replica is unusable: stop it, and the others carry on
            ending = ("lost", f"{replica.name} failed: {type(error).__name__}: {error}")
            replica.failures.append(ending[1])
            group, replica.group = replica.group, None
            if group is not None:
                group.kill()
        finally:
            with self._lock:  # retire_replica stops a replica itself once nothing pulls for it
                run.pullers -= 1
                replica.pulling = False
                leaving = replica.leaving
            if leaving:
                self._leave(replica)
                ending = ending or ("left",)
            if ending is not None:
                run.events.put(ending)

    def _pull_batches(self, replica: _Replica, run: _Run) -> tuple[Any, ...] | None:
        """Take a batch, compute it, report it, until the run ends or the replica retires;
        restart on failure. Returns the event that ends this puller early, if any."""
        while (index := self._take(replica, run)) is not None:
            try:
                results = self._compute(replica, index, run.batches[index], run.weights[index] if run.weights else 1,
                                        run.streams[index] if run.streams else None)
            except ReplicaFailed as failure:
                poison = None if isinstance(failure, _NotRestarted) else self._crashed(run, index, replica)
                if poison is not None:
                    replica.failures.append(str(failure))
                    return ("fatal", poison)
                run.todo.put(index)
                if replica.leaving:
                    return None
                if run.finished.is_set() or self._closing or not self._restart(replica, str(failure)):
                    return ("lost", str(failure))
                continue
            except EvalfleetError as error:
                return ("fatal", error)
            except Exception as error:  # a bug must fail the job, not leave it waiting
                return ("fatal", EvalfleetError(f"{replica.name} failed: {type(error).__name__}: {error}"))
            replica.batches += 1
            run.events.put(("done", index, results))
        return None

    def _crashed(self, run: _Run, index: int, replica: _Replica) -> PoisonBatch | None:
        """Note that batch `index` crashed `replica`; a PoisonBatch once it has crashed replicas on
        two devices that share nothing (a device common to both could explain both crashes)."""
        with self._lock:
            crashed = run.crashed.setdefault(index, {})
            crashed[replica.name] = replica.hardware
            pair = next(((a, b) for a in crashed for b in crashed if not crashed[a] & crashed[b]), None)
        if pair is None:
            return None
        gpus = {name: sorted(device for device in crashed[name] if device.startswith("GPU ")) for name in pair}
        return PoisonBatch(index, run.batches[index][0],
                           [f"{name} ({', '.join(gpus[name]) or 'CPU'})" for name in sorted(pair)])

    @staticmethod
    def _take(replica: _Replica, run: _Run) -> int | None:
        """The next batch for `replica`, or None once the run is over or the replica retired."""
        while not run.finished.is_set() and not replica.leaving:
            try:
                index = run.todo.get(timeout=0.1)
            except queue.Empty:
                continue
            if not replica.leaving:
                return index
            run.todo.put(index)  # retired while waiting: the batch is another replica's
        return None

    def _compute(self, replica: _Replica, index: int, batch: Sequence[Item], weight: int = 1,
                 stream: dict[str, int] | None = None) -> list[Any]:
        """One batch on one replica, in pieces that fit its token budget, within `weight` batch
        timeouts (a call of several batches merged; an hf rank decodes it as a stream within `stream`).

        Out of memory halves the replica's budget for the rest of the job; a multi-rank group
        that ran out of memory is restarted first (its ranks have left, see `rank.serve`).
        """
        results: list[Any] = []
        start = 0
        while start < len(batch):
            chunk = first_chunk(batch[start:], replica.token_budget)
            timed = replica.requests % self.time_every == 0
            replica.requests += 1
            began = time.perf_counter()
            try:
                message = ("batch", index, chunk, timed) if stream is None else ("batch", index, chunk, timed, stream)
                status, _, values, reports = replica.group.request(message, self.batch_timeout * weight)
            except BatchOutOfMemory as failure:
                replica.failures.append(str(failure))
                self._halve(replica, chunk)
                replica.oom_restarts += 1
                replica.group.kill()
                try:
                    self._start_replica(replica)
                except EvalfleetError:
                    raise
                except Exception as error:  # a failed restart, as in `_restart`
                    raise _NotRestarted(f"{replica.name} did not start again after running out of memory: "
                                        f"{type(error).__name__}: {error}") from error
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
        replica.token_budget = halved_budget(chunk, replica.name)
        replica.oom_halvings += 1

    def _record(self, replica: _Replica, reports: list[dict[str, Any]], seconds: float) -> None:
        """Keep a batch's traffic; the monitor hears of sampled (timed) batches only, so its
        communication share compares like with like. vLLM's engine stats are totals so far, kept
        from every batch."""
        with self._lock:
            self.communication.add_batch(reports)
            add_call_report(replica, reports[0])
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
            except Exception as error:  # a lost rank, a load that failed, no space for its log folder, no process slot
                replica.failures.append(str(error) if isinstance(error, ReplicaFailed | EvalfleetError)
                                        else f"{replica.name} did not restart: {type(error).__name__}: {error}")
                continue
            if not self._closing:
                return True
        if replica.group is not None:
            replica.group.kill()
        replica.group = None
        return False

    def describe(self) -> dict[str, Any]:
        """The layout the job started with (`dp` replicas), and how its replicas changed since."""
        initial = self.replicas[: self._initial_dp]
        return describe_layout(
            self.spec, self._initial_dp, self._info.get("ranks", []), self.load_seconds,
            devices=[device for replica in initial for device in replica.devices],
            placement=self.placement or [list(replica.devices) for replica in initial],
        ) | {
            "restarts": sum(replica.restarts for replica in self.replicas),
            "oom_halvings": sum(replica.oom_halvings for replica in self.replicas),
            "oom_restarts": sum(replica.oom_restarts for replica in self.replicas),
            "token_budgets": [replica.token_budget for replica in self.replicas],
            "communication": self.communication.as_dict(),
            "replica_changes": list(self._changes),
            "replicas_at_end": len(self.replica_names),
            "batches_per_replica": {replica.name: replica.batches for replica in self.replicas},
            **rows_per_decode_step([replica.decode for replica in self.replicas]),
            **{key: self._info[key] for key in ("backend_version", "vllm") if key in self._info},
        }

    def close(self, grace: float = 5.0) -> None:
        """Stop every group (killing what is still running after `grace` seconds); a `run` in
        progress in another thread then fails instead of restarting them. Safe to call twice."""
        with self._lock:  # a replica still loading sees this and does not join
            self._closing = True
            replicas = list(self.replicas)
        for replica in replicas:
            if replica.group is not None:
                replica.group.stop(grace)
                replica.group = None


def merged_spans(batches: Sequence[Sequence[Item]], live: int, spec: GroupSpec,
                 ranks: Sequence[dict[str, Any]]) -> list[tuple[int, int]] | None:
    """For a group whose replicas schedule their own rows (vLLM, or one hf process that batches
    continuously, as its `ranks` report), runs of consecutive generation batches to hand over as one
    call: at most SCHEDULED_ROWS requests and at least two calls per `live` replica, no batch split.
    None where batches go one by one."""
    streams = spec.processes == 1 and bool(ranks) and all(rank.get("continuous") for rank in ranks)
    if not (spec.backend == "vllm" or streams) or not batches or not isinstance(batches[0][0], GenerationItem):
        return None
    rows = sum(len(batch) for batch in batches)
    limit = min(SCHEDULED_ROWS, -(-rows // (2 * live)))
    spans: list[tuple[int, int]] = []
    start, taken = 0, 0
    for end, batch in enumerate(batches):
        if end > start and taken + len(batch) > limit:
            spans.append((start, end))
            start, taken = end, 0
        taken += len(batch)
    spans.append((start, len(batches)))
    return spans


class Merged:
    """Batches merged into calls along `spans`: each call's items, its timeout's multiple (the
    batches in it) and, with `streams` (an hf rank; vLLM schedules itself), how the rank decodes
    them as one stream: at most `rows` (the run's batch size, else MAX_ROWS) at once, newcomers
    prefilled within the largest batch's padded size."""

    def __init__(self, batches: Sequence[Sequence[Item]], spans: list[tuple[int, int]], *, streams: bool,
                 rows: int | None = None) -> None:
        self.originals, self.spans = batches, spans
        self.batches = [[item for b in range(start, end) for item in batches[b]] for start, end in spans]
        self.weights = [end - start for start, end in spans]
        self.streams: list[dict[str, int] | None] = [
            None if not streams else {"rows": rows or MAX_ROWS,
                                       "prefill_tokens": max(padded_tokens(batch) for batch in batches[start:end])}
            for start, end in spans
        ]

    def reporting(self, on_batch_done: BatchCallback) -> BatchCallback:
        """`on_batch_done` for each original batch of a merged call that finished."""
        def done(index: int, results: list[Any]) -> None:
            start, end = self.spans[index]
            for b in range(start, end):
                on_batch_done(b, results[: len(self.originals[b])])
                results = results[len(self.originals[b]) :]

        return done


def add_call_report(replica: Any, report: dict[str, Any]) -> None:
    """Fold rank 0's report of one call (parallel.call_report) into its replica's counts: decode steps
    and rows, and out-of-memory halvings inside a stream (the rank's, not the driver's)."""
    steps, rows = report.get("decoded", (0, 0))
    replica.decode = (replica.decode[0] + steps, replica.decode[1] + rows)
    replica.oom_halvings += report.get("oom_halvings", 0)


def rows_per_decode_step(counts: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Over every replica's decode steps (continuous batching), the rows each step decoded."""
    steps, rows = (sum(column) for column in zip(*counts, strict=True)) if counts else (0, 0)
    return {"rows_per_decode_step": round(rows / steps, 2)} if steps else {}


def _start_error(error: BaseException) -> BaseException:
    """What a failed start raises: a lost replica becomes an infrastructure error, the rest stay as they are."""
    if not isinstance(error, ReplicaFailed):
        return error
    wrapped = InfrastructureError(f"could not start the worker group: {error}")
    wrapped.__cause__ = error
    return wrapped


def describe_layout(spec: GroupSpec, dp: int, ranks: Sequence[dict[str, Any]], load_seconds: float, *,
                    devices: list[Any], placement: list[Any]) -> dict[str, Any]:
    """The layout part of results.json that every runner of worker groups writes, local or on Ray."""
    return {
        "strategy": ParallelLayout(spec.tp, spec.pp, dp, device_map=spec.device_map).strategy.value,
        "tp": spec.tp,
        "pp": spec.pp,
        "dp": dp,
        "devices": devices,
        "placement": placement,
        "backend": spec.backend,
        "dtype": loaded_dtype(ranks, spec.dtype),
        "device_names": sorted({rank["device_name"] for rank in ranks if "device_name" in rank}),
        "parallel_path": spec.path,
        "threads_per_rank": spec.threads,
        "load_seconds": round(load_seconds, 3),
        "parameters_per_rank": [rank["parameters"] for rank in ranks],
        "parameter_bytes_per_rank": [rank["parameter_bytes"] for rank in ranks],
    }


def loaded_dtype(ranks: Sequence[dict[str, Any]], asked: str) -> str:
    """The dtype the ranks loaded, as they report it (each decides `auto` for its own device), or
    `asked` before any has; ranks that decided differently would mix scores under one cache key."""
    dtypes = sorted({rank["dtype"] for rank in ranks if "dtype" in rank})
    if len(dtypes) > 1:
        raise EvalfleetError(f"the ranks loaded the model in different dtypes ({', '.join(dtypes)}) on different "
                             f"devices; pass --dtype to choose one")
    return dtypes[0] if dtypes else asked
