"""Worker groups as Ray actors: one actor per rank, on whichever nodes of a Ray cluster hold them.

Each job gets one placement group with one bundle (`{"GPU": 1}`) per rank; a bundle may be
pinned to a node (`ray.io/node-id` label), which is how the scheduler's placement (a tp group
inside one node, stages and replicas anywhere) reaches Ray. The ranks of a replica join
torch.distributed through a TCP store hosted by rank 0 at its node's address, then load their
part with the same rank-side code as local workers (`parallel.load_part`) and compute each batch
with `runner.compute`. Every rank of a replica gets the same batch, so no control
group is needed; rank 0's answer is the replica's.

A node that declares GPUs but has no CUDA runs its ranks on the CPU, one thread per declared
GPU, so the whole path runs on a CPU-only test cluster.

Results come back to the driver through Ray, never through a shared filesystem. A rank that
dies (its node lost, its process killed) takes its replica out of the run: the batch it had in
hand goes back on the queue and the other replicas finish the job, in the same attempt, with
nothing computed twice but that batch. Only when no replica is left does the run fail with
`NodeLost`; the scheduler then requeues the job and it resumes from the request cache on the
nodes that remain.

Out of memory is handled as in local groups (`workers.py`): a rank whose batch runs out of
memory answers "oom" instead of raising, the driver halves that replica's token budget for the
rest of the job and sends the batch again in smaller pieces; a multi-rank replica is first
started again in its bundles, since its peers may wait in a collective the rank left.

No wait is unbounded: a placement group not reserved within `placement_timeout`, or ranks not
loaded within `load_timeout`, is `NodeLost` too (the group is removed first), so the scheduler
requeues the job and places it again on a fresh view of the pool; a batch that a replica does
not finish within `batch_timeout` (the local groups' bound) fails the run as infrastructure.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from evalfleet.runtime.backends.base import Item
from evalfleet.runtime.group import GroupSpec, check_layout
from evalfleet.runtime.runner import BatchCallback, BatchRunner, first_chunk, halved_budget
from evalfleet.runtime.workers import (
    BATCH_TIMEOUT_S,
    Merged,
    add_call_report,
    describe_layout,
    loaded_dtype,
    merged_spans,
    rows_per_decode_step,
)
from evalfleet.types import EvalfleetError, InfrastructureError, NodeLost

NODE_LABEL = "ray.io/node-id"
CONNECT_TIMEOUT_S = 10.0
PLACEMENT_TIMEOUT_S = 60.0
"""The scheduler places a job on GPUs it sees free, so a group still pending after this names a
node that is gone (or GPUs Ray has not released): better requeued on a fresh pool than waited for."""
# Actors on other machines do not inherit the driver's environment as local ranks do: these
# variables (and every EVALFLEET_* one) travel with each actor's runtime_env.
FORWARDED = ("PYTHONPATH",)


def rank_env(rank: int) -> dict[str, str]:
    """The environment of one rank's actor process: the driver's evalfleet settings, and the rank."""
    forwarded = {k: v for k, v in os.environ.items() if k.startswith("EVALFLEET_") or k in FORWARDED}
    return forwarded | {"EVALFLEET_WORKER_RANK": str(rank)}


class RankActor:
    """One rank of one replica. Wrapped by `ray.remote` when a runner starts (Ray stays optional)."""

    def __init__(self, spec_json: str, rank: int) -> None:
        import torch

        self.spec = GroupSpec.from_json(spec_json)  # device and dtype as asked: `load` decides them here
        self.rank = rank
        self.part: Any = None
        self.store: Any = None
        torch.set_num_threads(self.spec.threads)

    def where(self) -> dict[str, Any]:
        import ray

        context = ray.get_runtime_context()
        return {"rank": self.rank, "node_id": context.get_node_id(), "address": ray.util.get_node_ip_address(),
                "pid": os.getpid(), "device": self.spec.device}

    def host_store(self) -> int:
        """Rank 0 hosts the replica's rendezvous; the port is the kernel's choice, never a guess."""
        import torch.distributed as dist

        from evalfleet.runtime.rank import COLLECTIVE_TIMEOUT

        self.store = dist.TCPStore(self.where()["address"], 0, is_master=True, wait_for_workers=False,
                                   timeout=COLLECTIVE_TIMEOUT)
        return int(self.store.port)

    def load(self, address: str, port: int) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        from evalfleet.runtime import parallel
        from evalfleet.runtime.rank import COLLECTIVE_TIMEOUT

        started = time.perf_counter()
        self.spec = self.spec.on_this_device()
        if self.spec.world_size > 1:
            on_gpu = self.spec.device == "cuda"
            if on_gpu:
                torch.cuda.set_device(0)
            store = self.store or dist.TCPStore(address, port, is_master=False, timeout=COLLECTIVE_TIMEOUT)
            dist.init_process_group("nccl" if on_gpu else "gloo", store=store, rank=self.rank,
                                    world_size=self.spec.world_size, timeout=COLLECTIVE_TIMEOUT)
        self.part = parallel.load_part(self.spec)
        report = parallel.rank_report(self.part, self.rank)
        return report | {"load_seconds": time.perf_counter() - started, "max_length": self.part.backend.max_length,
                         **self.where()}

    def compute(self, items: list[Item], stream: dict[str, int] | None = None,
                bound_s: float | None = None) -> tuple[str, list[Any] | None, dict[str, Any]]:
        """("done", results, report), or ("oom", None, report) when the batch ran out of memory (as
        `rank.serve` answers); the report: the call's decode steps and rows (`decoded`) and a stream's
        out-of-memory halvings inside this rank. `stream`: generation batches merged, decoded as one
        stream (runner.compute). `bound_s`, how long the driver waits for the call, matters to a vLLM
        replica's actor, which waits on its engine's process (ray_vllm.py); a rank computes the call itself."""
        import torch

        from evalfleet.runtime import runner
        from evalfleet.runtime.parallel import call_counts, call_report

        backend = self.part.backend
        counts = call_counts(backend)
        status, results = "done", None
        try:
            results = runner.compute(backend, items, stream)
        except Exception as error:
            if not runner.out_of_memory(error):
                raise
            if self.spec.device == "cuda":
                torch.cuda.empty_cache()
            status = "oom"
        return status, results, call_report(backend, counts)


@dataclasses.dataclass
class _Replica:
    index: int
    actors: list[Any]
    ranks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    token_budget: int | None = None
    calls: int = 0  # compute calls sent to it, pieces of batches included
    decode: tuple[int, int] = (0, 0)  # its ranks' continuous batching: decode steps, rows decoded
    oom_halvings: int = 0
    oom_restarts: int = 0

    @property
    def name(self) -> str:
        return f"replica {self.index}"


def check_reachable(address: str) -> None:
    """Refuse a HOST:PORT nobody listens on at once: Ray itself retries it for minutes."""
    host, _, port = address.rpartition(":")
    if not (host and port.isdigit()):
        return  # `auto`, or a form Ray checks itself
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise EvalfleetError(f"cannot reach the Ray cluster at '{address}': "
                             f"{error.strerror or type(error).__name__}") from None


def connect(address: str) -> None:
    """Join the Ray cluster at `address` (`auto` finds a local head) as a driver, once per process."""
    import ray

    if ray.is_initialized():
        return
    check_reachable(address)
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise EvalfleetError(f"cannot reach the Ray cluster at '{address}': {str(error).splitlines()[0]}") from None


class RayGroupRunner(BatchRunner):
    """Batches computed by `dp` replicas of `tp * pp` Ray actors each.

    `nodes` gives the Ray node id for each rank (dp-major, then stage, then tp rank), or None
    to let Ray choose. Replicas take batches from one queue as they finish the last one.
    """

    def __init__(self, spec: GroupSpec, dp: int, nodes: Sequence[str | None] | None = None, *,
                 placement_timeout: float = PLACEMENT_TIMEOUT_S, load_timeout: float = 1800.0,
                 batch_timeout: float = BATCH_TIMEOUT_S) -> None:
        self.spec = spec
        self.dp = dp
        self.nodes = list(nodes) if nodes is not None else [None] * (dp * spec.world_size)
        if len(self.nodes) != dp * spec.world_size:
            raise EvalfleetError(f"{len(self.nodes)} nodes given for {dp * spec.world_size} ranks")
        self.placement_timeout = placement_timeout
        self.load_timeout = load_timeout
        self.batch_timeout = batch_timeout
        self.replicas: list[_Replica] = []
        self.group: Any = None
        self.load_seconds = 0.0
        self.began = time.perf_counter()
        self.changes: list[dict[str, Any]] = []

    def start(self) -> RayGroupRunner:
        import ray
        from ray.util.placement_group import placement_group

        check_layout(self.spec)
        began = time.perf_counter()
        per_actor = self.gpus_per_actor
        nodes = self.nodes[::per_actor]
        for r in range(self.dp) if per_actor > 1 else ():
            if len(set(self.nodes[r * per_actor:(r + 1) * per_actor])) > 1:
                raise EvalfleetError(f"a vLLM replica runs on one node, and replica {r} was placed on several; "
                                     f"place each replica's {per_actor} GPUs on one node")
        bundles = [{"GPU": float(per_actor)} for _ in nodes]
        selectors = [{NODE_LABEL: node} if node else {} for node in nodes]
        self.group = placement_group(bundles, strategy="PACK", bundle_label_selector=selectors)
        ready, _ = ray.wait([self.group.ready()], timeout=self.placement_timeout)
        if not ready:
            self.close()
            raise NodeLost(f"the Ray cluster could not reserve {len(bundles)} GPU(s) for this job in "
                           f"{self.placement_timeout:.0f}s (a node it was placed on may be gone)")
        self.replicas = [_Replica(r, self._actors(r)) for r in range(self.dp)]
        self._load(self.replicas)
        try:
            loaded_dtype([rank for replica in self.replicas for rank in replica.ranks], self.spec.dtype)
        except EvalfleetError:
            self.close()
            raise
        self.load_seconds = time.perf_counter() - began
        return self

    @property
    def gpus_per_actor(self) -> int:
        """A rank's one GPU; a vLLM replica is one actor over its tp x pp GPUs (`ray_vllm`)."""
        return self.spec.world_size if self.spec.backend == "vllm" else 1

    def _actors(self, r: int) -> list[Any]:
        """The actors of replica `r`, each in its own bundle of the job's placement group: one per rank,
        or a vLLM replica's one."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor: Any = RankActor
        if self.spec.backend == "vllm":
            from evalfleet.runtime.ray_vllm import VllmReplicaActor as actor
        remote = ray.remote(actor)
        count = self.spec.world_size // self.gpus_per_actor
        return [
            remote.options(num_cpus=0, num_gpus=self.gpus_per_actor, max_restarts=0,
                           runtime_env={"env_vars": rank_env(k)},
                           scheduling_strategy=
                           PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=r * count + k))
            .remote(self.spec.to_json(), r if self.spec.backend == "vllm" else k)
            for k in range(count)
        ]

    def _load(self, replicas: list[_Replica]) -> None:
        """Join each replica's ranks and load the model, within `load_timeout`; on failure stop every rank."""
        import ray

        deadline = time.monotonic() + self.load_timeout  # one bound for the whole load

        def get(refs: Any) -> Any:
            return ray.get(refs, timeout=max(0.0, deadline - time.monotonic()))

        try:
            loads = []
            for replica in replicas:
                head = replica.actors[0]
                address = get(head.where.remote())["address"]
                port = get(head.host_store.remote()) if len(replica.actors) > 1 else 0
                loads.append([actor.load.remote(address, port) for actor in replica.actors])
            for replica, refs in zip(replicas, loads):
                replica.ranks = get(refs)
        except ray.exceptions.RayActorError as error:
            self.close()
            raise NodeLost(f"a rank died while loading the model: {_first_line(error)}") from None
        except ray.exceptions.GetTimeoutError:  # e.g. a bundle whose node died, waiting to be rescheduled there
            self.close()
            raise NodeLost(f"the ranks did not load the model within {self.load_timeout:.0f}s "
                           f"(a node they were placed on may be gone)") from None
        except ray.exceptions.RayTaskError as error:
            self.close()
            raise EvalfleetError(f"a rank failed to load the model: {_first_line(error)}") from None

    def _restart(self, replica: _Replica) -> None:
        """Replace the ranks of `replica` (in the same bundles) with fresh ones that load the model again."""
        import ray

        for actor in replica.actors:
            ray.kill(actor)
        replica.actors = self._actors(replica.index)
        self._load([replica])

    @property
    def max_length(self) -> int:
        return int(self.replicas[0].ranks[0]["max_length"])

    @property
    def shares_prefixes(self) -> bool:
        return self.spec.share_prefixes

    def rank_nodes(self) -> list[list[dict[str, Any]]]:
        """Per replica, where each rank runs: node id, address, pid, device."""
        keys = ("rank", "node_id", "address", "pid", "device")
        return [[{key: rank[key] for key in keys} for rank in replica.ranks] for replica in self.replicas]

    def run(self, batches: Sequence[Sequence[Item]], on_batch_done: BatchCallback) -> None:
        """Generation batches go merged to vLLM replicas and to hf replicas that batch continuously
        (workers.merged_spans), each call bounded by its batches' timeouts together."""
        spans = merged_spans(batches, max(1, len(self.replicas)), self.spec,
                             [rank for replica in self.replicas[:1] for rank in replica.ranks])
        if spans is None:
            self._run_batches(batches, on_batch_done, [1] * len(batches), [None] * len(batches))
            return
        merged = Merged(batches, spans, streams=self.spec.backend != "vllm", rows=self.generation_rows)
        self._run_batches(merged.batches, merged.reporting(on_batch_done), merged.weights, merged.streams)

    def _run_batches(self, batches: Sequence[Sequence[Item]], on_batch_done: BatchCallback, weights: Sequence[int],
                     streams: Sequence[dict[str, int] | None]) -> None:
        import ray

        todo = collections.deque(range(len(batches)))
        idle = collections.deque(self.replicas)
        done: dict[int, list[Any]] = {}  # results so far of the batches that went out in pieces
        # every unfinished ref -> its replica, batch, the piece sent, the piece's refs and when it is overdue
        owner: dict[Any, tuple[_Replica, int, list[Item], list[Any], float]] = {}
        while todo or owner:
            while todo and idle:
                replica, index = idle.popleft(), todo.popleft()
                chunk = first_chunk(batches[index][len(done.get(index, ())):], replica.token_budget)
                bound = self.batch_timeout * weights[index]
                refs = [actor.compute.remote(chunk, streams[index], bound) for actor in replica.actors]
                replica.calls += 1
                overdue = time.monotonic() + bound
                owner.update({ref: (replica, index, chunk, refs, overdue) for ref in refs})
            late, late_index, _, _, overdue = min(owner.values(), key=lambda entry: entry[4])
            finished, _ = ray.wait(list(owner), num_returns=1, timeout=max(0.0, overdue - time.monotonic()))
            if not finished:
                raise InfrastructureError(f"replica {late.index} did not finish batch {late_index} "
                                          f"in {self.batch_timeout * weights[late_index]:.0f}s")
            replica, index, chunk, refs, _ = owner.pop(finished[0])
            try:
                status, *_ = self._get(finished[0], replica)  # a dead rank fails here, before its peers time out
                if status != "oom" and any(ref in owner for ref in refs):
                    continue
                oom = status == "oom" or any(self._get(ref, replica)[0] == "oom" for ref in refs)
            except NodeLost as lost:
                for ref in refs:
                    owner.pop(ref, None)
                todo.appendleft(index)  # what it had in hand is another replica's now
                self._lose(replica, lost)
                continue
            if oom:
                # The rank's peers may wait in a collective it left: their answers are dropped.
                for ref in refs:
                    owner.pop(ref, None)
                replica.token_budget = halved_budget(chunk, replica.name)
                replica.oom_halvings += 1
                if len(replica.actors) > 1:
                    replica.oom_restarts += 1
                    self._restart(replica)
                todo.appendleft(index)
                idle.append(replica)
                continue
            _, results, report = self._get(refs[0], replica)
            add_call_report(replica, report)
            done.setdefault(index, []).extend(results)
            if len(done[index]) < len(batches[index]):
                todo.appendleft(index)
            else:
                on_batch_done(index, done.pop(index))
            idle.append(replica)

    def _lose(self, replica: _Replica, lost: NodeLost) -> None:
        """Take a replica whose rank died out of the run; raise `lost` if it was the last one."""
        import ray

        for actor in replica.actors:
            ray.kill(actor)
        self.replicas.remove(replica)
        self.changes.append({"at_s": round(time.perf_counter() - self.began, 3), "change": "lost",
                             "replica": replica.name, "reason": str(lost),
                             "nodes": sorted({rank["node_id"] for rank in replica.ranks})})
        if not self.replicas:
            raise lost

    def _get(self, ref: Any, replica: _Replica) -> Any:
        import ray

        try:
            return ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.ObjectLostError) as error:
            nodes = sorted({rank["node_id"] for rank in replica.ranks})
            raise NodeLost(f"replica {replica.index} lost a rank on node {' or '.join(n[:12] for n in nodes)}: "
                           f"{type(error).__name__}") from None
        except ray.exceptions.RayTaskError as error:
            if self._peer_lost(replica):  # a collective failed because a peer's process died with its node
                raise NodeLost(f"replica {replica.index} lost a rank: {_first_line(error)}") from None
            raise EvalfleetError(f"replica {replica.index} failed: {_first_line(error)}") from None

    def _peer_lost(self, replica: _Replica, timeout_s: float = 30.0) -> bool:
        """Whether a rank of `replica` is dead; Ray may take its health-check period to say so."""
        import ray

        try:
            ray.get([actor.where.remote() for actor in replica.actors], timeout=timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError, ray.exceptions.GetTimeoutError):
            return True
        return False

    def describe(self) -> dict[str, Any]:
        return describe_layout(
            self.spec, self.dp, self.replicas[0].ranks if self.replicas else [], self.load_seconds,
            devices=[rank["device"] for replica in self.replicas for rank in replica.ranks],
            placement=[[rank["node_id"] for rank in replica.ranks] for replica in self.replicas],
        ) | {
            "oom_halvings": sum(replica.oom_halvings for replica in self.replicas),
            "oom_restarts": sum(replica.oom_restarts for replica in self.replicas),
            "token_budgets": [replica.token_budget for replica in self.replicas],
            "calls_per_replica": [replica.calls for replica in self.replicas],
            **rows_per_decode_step([replica.decode for replica in self.replicas]),
            **({"replica_changes": self.changes, "replicas_at_end": len(self.replicas)} if self.changes else {}),
            "ray": {"ranks": self.rank_nodes()},
            **{key: rank[key] for replica in self.replicas[:1] for rank in replica.ranks[:1]
               for key in ("backend_version", "vllm") if key in rank},  # what a vLLM replica reports of its engine
        }

    def close(self, grace: float = 0.0) -> None:
        """Kill every rank and free the placement group. Safe to call twice."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for replica in self.replicas:
            for actor in replica.actors:
                ray.kill(actor)
        self.replicas = []
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__
