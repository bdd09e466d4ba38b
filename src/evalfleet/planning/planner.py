"""`plan()`: choose a layout for a model on an inventory, place it, and explain the choice.

Every (tp, pp) the model's shape allows and the nodes can hold is sized by the memory model;
those that fit get as many data-parallel replicas as the usable GPUs allow, and the cost model
ranks them by the whole job's tokens/s. Where transformers cannot pipeline the family, layers
split over one node's GPUs in one process (the `device_map` strategy) are candidates too, at
their own, slower speed. A forced strategy or explicit tp/pp/dp only narrows the candidates; when none is left the plan says why instead of raising, because the scheduler asks
thousands of "what if" questions and a refusal is an answer.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Any

from evalfleet.planning import backends
from evalfleet.planning.allocation import Device, place
from evalfleet.planning.hardware import Inventory
from evalfleet.planning.memory import MemoryBreakdown, MemoryModel, estimate_memory
from evalfleet.planning.model_profile import GIB, ModelProfile, PlanningError, normalize_dtype, profile_model
from evalfleet.planning.strategy import (
    COMPUTE_EFFICIENCY,
    DistributionStrategy,
    ParallelLayout,
    layout_problem,
    microbatches,
    replica_tokens_per_s,
    shape_allowed,
    to_strategy,
)

_SPLIT = (
    DistributionStrategy.TENSOR_PARALLEL,
    DistributionStrategy.PIPELINE_PARALLEL,
    DistributionStrategy.HYBRID,
    DistributionStrategy.DATA_PARALLEL,
    DistributionStrategy.DEVICE_MAP,
)


@dataclass
class Plan:
    """A layout, where each rank runs, what each GPU holds, and whether it all fits."""

    profile: ModelProfile
    dtype: str
    layout: ParallelLayout
    engine: str
    fits: bool
    reason: str
    placement: list[Device]
    per_gpu: MemoryBreakdown
    estimated_tokens_per_s: float
    gpus_used: int
    nodes_used: int
    alternatives: list[Plan] = field(default_factory=list)
    max_length: int = 0
    batch_size: int = 0
    backend: str = "hf"

    @property
    def strategy(self) -> DistributionStrategy:
        return self.layout.strategy

    def to_dict(self, brief: bool = False) -> dict[str, Any]:
        short = {
            "strategy": self.strategy.value,
            "tp": self.layout.tp,
            "pp": self.layout.pp,
            "dp": self.layout.dp,
            "gpus_used": self.gpus_used,
            "nodes_used": self.nodes_used,
            "per_gpu_gb": self.per_gpu.to_dict(),
            "fits": self.fits,
            "estimated_tokens_per_s": round(self.estimated_tokens_per_s, 1),
        }
        if brief:
            return short
        profile = self.profile
        model = {
            "name": profile.name,
            "params": profile.params,
            "dtype": self.dtype,
            "weights_gb": round(profile.weight_bytes(self.dtype) / GIB, 2),
            "kv_bytes_per_token": profile.kv_bytes_per_token(self.dtype),
            "layers": profile.num_layers,
            "heads": profile.num_heads,
            "kv_heads": profile.num_kv_heads,
        }
        return {
            "model": model,
            "engine": self.engine,
            "backend": {"name": self.backend, "version": backends.version(self.backend)},
            **short,
            "reason": self.reason,
            "placement": [list(device) for device in self.placement],
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "alternatives": [alt.to_dict(brief=True) for alt in self.alternatives],
        }


@dataclass
class _Candidate:
    tp: int
    pp: int
    memory: MemoryBreakdown
    replicas: int = 0
    tokens_per_s: float = 0.0
    device_map: bool = False

    def describe(self) -> str:
        return f"(device_map over {self.pp} GPUs)" if self.device_map else f"(tp={self.tp}, pp={self.pp})"


@dataclass(frozen=True)
class _Ask:
    """What the caller asked for, validated once."""

    forced: DistributionStrategy
    tp: int | None
    pp: int | None
    dp: int | None
    max_gpus: int | None
    busy: frozenset[Device]
    threshold_gb: float
    alternatives: int
    dtype: str
    max_length: int
    batch_size: int
    backend: str = "hf"

    @property
    def explicit(self) -> bool:
        """A split the user asked for by name or by size."""
        return self.forced in _SPLIT or any(v is not None and v > 1 for v in (self.tp, self.pp, self.dp))

    @property
    def wanted(self) -> int:
        """The fewest replicas that satisfy the request."""
        return 2 if self.forced is DistributionStrategy.DATA_PARALLEL else self.dp or 1

    @property
    def sizes(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "max_length": self.max_length, "batch_size": self.batch_size}

    def describe(self) -> str:
        given = ", ".join(f"{name}={getattr(self, name)}" for name in ("tp", "pp", "dp") if getattr(self, name))
        return f"strategy '{self.forced.value}'" + (f", {given}" if given else "")


class _Pool:
    """The usable part of an inventory, summarised once per plan: free memory per node (ascending)
    and the slowest GPU and links, which bound every layout's speed."""

    def __init__(self, inventory: Inventory, busy: frozenset[Device], max_gpus: int | None) -> None:
        self.free = [
            sorted(gpu.free_gb for g, gpu in enumerate(node.gpus) if (n, g) not in busy)
            for n, node in enumerate(inventory.nodes)
        ]
        self.max_gpus = max_gpus
        self.total_gpus = inventory.num_gpus
        self.largest_free = max((node[-1] for node in self.free if node), default=0.0)
        self.largest_node = max(map(len, self.free), default=0)
        usable = sum(map(len, self.free))
        self.budget = usable if max_gpus is None else min(usable, max_gpus)
        devices = [
            gpu for n, node in enumerate(inventory.nodes) for g, gpu in enumerate(node.gpus) if (n, g) not in busy
        ]
        self.tflops = min((gpu.spec.bf16_tflops for gpu in devices), default=1.0)
        self.memory_bandwidth_gbps = min((gpu.spec.memory_bandwidth_gbps for gpu in devices), default=1.0)
        self.intra_gbps = min(node.intra_bandwidth_gbps for node in inventory.nodes) or 1.0
        self.inter_gbps = min(node.inter_bandwidth_gbps for node in inventory.nodes)

    def replicas(self, need_gb: float, tp: int, pp: int) -> int:
        """How many tp x pp replicas fit on GPUs with `need_gb` free, tp groups inside nodes."""
        if need_gb > self.largest_free:
            return 0
        groups = sum((len(node) - bisect_left(node, need_gb)) // tp for node in self.free)
        if self.max_gpus is not None:
            return min(groups // pp, self.max_gpus // (tp * pp))
        return groups // pp


def plan(
    profile: ModelProfile | str | dict[str, Any],
    inventory: Inventory,
    *,
    dtype: str = "bfloat16",
    max_length: int = 2048,
    batch_size: int = 8,
    strategy: DistributionStrategy | str = "auto",
    tp: int | None = None,
    pp: int | None = None,
    dp: int | None = None,
    max_gpus: int | None = None,
    busy: Collection[Device] = frozenset(),
    lightweight_threshold_gb: float = 15.0,
    alternatives: int = 3,
    backend: str = "auto",
) -> Plan:
    """The best layout of `profile` on `inventory`'s usable GPUs; `.fits` is False, with a reason, when none is.

    `busy` GPUs are never used; `max_gpus` caps the GPUs of the whole job; `alternatives` is how
    many runner-up layouts (placed too) come with the plan. Only layouts the `backend` can run
    are proposed; `auto` tries each installed backend, vLLM first on GPUs, and keeps the first that fits.
    """
    if not isinstance(profile, ModelProfile):
        profile = profile_model(profile)
    for name, value in (("max_length", max_length), ("batch_size", batch_size), ("tp", tp), ("pp", pp), ("dp", dp)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise PlanningError(f"{name} must be a positive whole number, not {value!r}")
    if max_gpus is not None and max_gpus < 0:
        raise PlanningError(f"max_gpus must not be negative, not {max_gpus}")
    ask = _Ask(
        forced=to_strategy(strategy),
        tp=tp,
        pp=pp,
        dp=dp,
        max_gpus=max_gpus,
        busy=frozenset(busy),
        threshold_gb=lightweight_threshold_gb,
        alternatives=max(alternatives, 0),
        dtype=normalize_dtype(dtype, profile.default_dtype),
        max_length=min(max_length, profile.max_positions or max_length),
        batch_size=batch_size,
    )
    results = []
    for name in backends.candidates(backend, on_gpu=not inventory.is_cpu_only) or ["hf"]:
        ask = replace(ask, backend=name)
        result = _plan_cpu(profile, inventory, ask) if inventory.is_cpu_only else _plan_gpus(profile, inventory, ask)
        for item in (result, *result.alternatives):
            item.max_length, item.batch_size, item.backend = ask.max_length, ask.batch_size, name
        results.append(result)
        if result.fits:
            return result
    return results[0]


def _problem(profile: ModelProfile, ask: _Ask, tp: int, pp: int) -> str | None:
    """Why this split cannot be, by the model's shape or by what the backend runs."""
    return layout_problem(profile, tp, pp) or backends.layout_problem(
        ask.backend, profile.family, profile.architecture, tp, pp
    )


def _device_map_degrees(profile: ModelProfile, ask: _Ask, pool: _Pool) -> list[int]:
    """GPUs a device_map replica may take: offered where transformers cannot pipeline the family
    (or where it is asked for by name), within one node."""
    if ask.tp not in (None, 1) or not shape_allowed(ask.forced, 1, 2, device_map=True):
        return []
    if backends.device_map_problem(ask.backend, profile.family):
        return []
    asked = ask.forced is DistributionStrategy.DEVICE_MAP
    if not asked and backends.layout_problem(ask.backend, profile.family, profile.architecture, 1, 2) is None:
        return []  # real pipeline stages do better
    degrees = range(2, pool.largest_node + 1) if ask.pp is None else [ask.pp] if ask.pp > 1 else []
    return [k for k in degrees if layout_problem(profile, 1, k) is None]


def _plan_gpus(profile: ModelProfile, inventory: Inventory, ask: _Ask) -> Plan:
    pool = _Pool(inventory, ask.busy, ask.max_gpus)
    memory_of = MemoryModel(profile, **ask.sizes)
    per_gpu_rate = pool.tflops * 1e12 * COMPUTE_EFFICIENCY / profile.flops_per_token(ask.max_length // 2)
    rejections: list[str] = []
    feasible: list[_Candidate] = []
    tried: list[_Candidate] = []
    degrees: list[int] = []
    best = 0.0

    def consider(candidate: _Candidate) -> None:
        """Size a candidate's replicas and speed; keep it among the feasible ones if enough fit."""
        tried.append(candidate)
        t, p = candidate.tp, candidate.pp
        if candidate.device_map:  # one process holds the replica's GPUs: they share a node, as a tp group does
            replicas = pool.replicas(candidate.memory.total, p, 1)
        else:
            replicas = pool.replicas(candidate.memory.total, t, p)
        if ask.dp is not None or ask.forced is DistributionStrategy.SINGLE:
            replicas = min(replicas, ask.wanted)
        if replicas < ask.wanted:
            return
        stage_link = pool.intra_gbps if t * p <= pool.largest_node else pool.inter_gbps
        rate = replica_tokens_per_s(
            profile,
            t,
            p,
            stage_link_gbps=stage_link,
            tflops=pool.tflops,
            memory_bandwidth_gbps=pool.memory_bandwidth_gbps,
            intra_gbps=pool.intra_gbps,
            device_map=candidate.device_map,
            **ask.sizes,
        )
        candidate.replicas, candidate.tokens_per_s = replicas, replicas * rate
        feasible.append(candidate)

    for t in range(1, pool.largest_node + 1) if ask.tp is None else [ask.tp]:
        problem = _problem(profile, ask, t, 1)
        if problem is None and t > pool.largest_node:
            problem = f"tp={t} needs {t} GPUs in one node, and the largest node has {pool.largest_node} usable"
        if problem:
            rejections.append(problem)
            continue
        degrees.append(t)
        for p in range(1, max(pool.budget // t, 1) + 1) if ask.pp is None else [ask.pp]:
            if not shape_allowed(ask.forced, t, p):
                continue
            problem = _problem(profile, ask, t, p)
            if problem:
                rejections.append(problem)
                break
            micro = microbatches(ask.batch_size, p)[1]
            if best and pool.budget * per_gpu_rate * micro / (micro + p - 1) < best:
                break  # even perfect scaling of a deeper pipeline cannot beat the best so far
            consider(_Candidate(t, p, memory_of(t, p)))
            best = max((c.tokens_per_s for c in feasible), default=0.0)
    for k in _device_map_degrees(profile, ask, pool):
        consider(_Candidate(1, k, memory_of(1, k), device_map=True))

    if not feasible:
        if ask.pp is None:
            tried += _beyond_budget(profile, memory_of, pool, degrees, ask)
        return _refusal(profile, ask, pool, tried, rejections, memory_of)
    feasible.sort(key=lambda c: (-c.tokens_per_s, c.tp * c.pp * c.replicas, c.pp))
    chosen = [_placed(profile, inventory, ask, c) for c in feasible[: 1 + ask.alternatives]]
    single = any(c.tp == 1 and c.pp == 1 for c in feasible)
    engine = "lightweight" if single and not ask.explicit and _light(profile, ask) else "distributed"
    for item in chosen:
        item.engine = engine
    chosen[0].alternatives = chosen[1:]
    return chosen[0]


def _light(profile: ModelProfile, ask: _Ask) -> bool:
    """Small enough for the single-device engine: weights within the threshold."""
    return profile.weight_bytes(ask.dtype) / GIB <= ask.threshold_gb


def _beyond_budget(
    profile: ModelProfile, memory_of: MemoryModel, pool: _Pool, degrees: list[int], ask: _Ask
) -> list[_Candidate]:
    """Layouts larger than the usable GPUs, only to say in a refusal how many GPUs the model would need."""
    found = []
    for t in degrees:
        for p in range(max(pool.budget // t, 1) + 1, pool.total_gpus // t + 1):
            if not shape_allowed(ask.forced, t, p):
                continue
            if _problem(profile, ask, t, p):
                break
            found.append(_Candidate(t, p, memory_of(t, p)))
            if found[-1].memory.total <= pool.largest_free:
                break
    return found


def _placed(profile: ModelProfile, inventory: Inventory, ask: _Ask, c: _Candidate) -> Plan:
    layout = ParallelLayout(c.tp, c.pp, c.replicas, device_map=c.device_map)
    placement = place(layout, inventory, ask.busy, need_gb=c.memory.total)
    nodes = {n for n, _ in placement}
    device_gb = min(inventory.nodes[n].gpus[g].free_gb for n, g in placement)
    kind = {
        DistributionStrategy.SINGLE: "fits one GPU",
        DistributionStrategy.DATA_PARALLEL: f"fits one GPU, so it is replicated on {c.replicas} GPUs",
        DistributionStrategy.TENSOR_PARALLEL: f"tensor parallel over {c.tp} GPUs of one node",
        DistributionStrategy.PIPELINE_PARALLEL: f"a pipeline of {c.pp} stages",
        DistributionStrategy.HYBRID: f"a pipeline of {c.pp} stages, each tensor parallel over {c.tp} GPUs",
        DistributionStrategy.DEVICE_MAP: f"layers split over {c.pp} GPUs of one node in one process (device_map; "
        "one GPU computes at a time)",
    }[layout.strategy]
    if layout.world_size > 1 and c.replicas > 1:
        kind += f", {c.replicas} replicas"
    where = f" on {len(nodes)} nodes" if len(nodes) > 1 else ""
    reason = f"{kind}{where}; {c.memory.total:.1f} of {device_gb:.0f} GB per GPU"
    return Plan(
        profile, ask.dtype, layout, "", True, reason, placement, c.memory, c.tokens_per_s, len(placement), len(nodes)
    )


def _refusal(
    profile: ModelProfile,
    ask: _Ask,
    pool: _Pool,
    tried: list[_Candidate],
    rejections: list[str],
    memory_of: MemoryModel,
) -> Plan:
    """A plan that does not fit, sized for the layout that came closest, with the reason."""
    largest = pool.largest_free
    memory, layout = memory_of(1, 1), ParallelLayout()
    if not tried and pool.largest_node == 0:
        reason = f"no GPU is free: all {pool.total_gpus} are busy"
    elif not tried:
        what = f"strategy '{ask.forced.value}'" if ask.forced is not DistributionStrategy.AUTO else "the model"
        reason = rejections[0] if rejections else f"{what} has no layout on {pool.budget} usable GPU(s)"
    else:
        holdable = [c for c in tried if c.memory.total <= largest]
        if holdable:
            least = min(holdable, key=lambda c: (c.tp * c.pp, c.memory.total))
        else:
            least = min(tried, key=lambda c: (c.memory.total, c.tp * c.pp))
        memory, layout = least.memory, ParallelLayout(least.tp, least.pp, device_map=least.device_map)
        where = least.describe()
        needed = least.tp * least.pp * ask.wanted
        if not holdable:
            gpu = "free GPU" if ask.busy else "GPU"
            reason = f"needs {memory.total:.1f} GB per GPU at best {where}; the largest {gpu} has {largest:.0f} GB"
        elif ask.max_gpus is not None and needed > ask.max_gpus:
            reason = f"needs {needed} GPUs {where}, more than the {ask.max_gpus} the job may use"
        else:
            usable = sum(len(node) - bisect_left(node, memory.total) for node in pool.free)
            reason = (
                f"needs {needed} GPUs {where} with {memory.total:.1f} GB free, in groups of "
                f"{least.pp if least.device_map else least.tp} within a node; {usable} such GPUs are usable"
            )
    limits = [backends.layout_problem(ask.backend, profile.family, profile.architecture, t, p) for t, p in ((2, 1), (1, 2))]
    if tried and any(limits):
        if any(c.device_map for c in tried):
            limits.append("a device_map split stays inside one node")
        reason += f", and {backends.LABELS[ask.backend]} cannot split it further: {'; '.join(filter(None, limits))}"
    engine = "lightweight" if not ask.explicit and _light(profile, ask) else "distributed"
    return Plan(profile, ask.dtype, layout, engine, False, reason, [], memory, 0.0, 0, 0)


def _plan_cpu(profile: ModelProfile, inventory: Inventory, ask: _Ask) -> Plan:
    """The CPU runs one unsplit model with its RAM as memory; a pool of CPU slots offers one per free slot."""
    slots = [(n, g) for n, node in enumerate(inventory.nodes) for g in range(len(node.gpus)) if (n, g) not in ask.busy]
    memory = estimate_memory(profile, 1, 1, on_cpu=True, **ask.sizes)
    layout = ParallelLayout()
    if ask.explicit:
        reason = (
            f"only the CPU is available, and it cannot split the model ({ask.describe()}); give --gpus to plan for GPUs"
        )
        return Plan(profile, ask.dtype, layout, "distributed", False, reason, [], memory, 0.0, 0, 0)
    if not slots:
        return Plan(profile, ask.dtype, layout, "lightweight", False, "the CPU is busy", [], memory, 0.0, 0, 0)
    node, slot = slots[0]
    device = inventory.nodes[node].gpus[slot]
    problem = backends.device_problem(ask.backend, profile.head_dim, on_cpu=True)
    if problem:
        return Plan(profile, ask.dtype, layout, "distributed", False, problem, [], memory, 0.0, 0, 0)
    if memory.total > device.free_gb:
        reason = f"needs {memory.total:.1f} GB of RAM on the CPU; {device.free_gb:.1f} GB are free"
        return Plan(profile, ask.dtype, layout, "lightweight", False, reason, [], memory, 0.0, 0, 0)
    rate = replica_tokens_per_s(
        profile,
        1,
        1,
        tflops=device.spec.bf16_tflops,
        memory_bandwidth_gbps=device.spec.memory_bandwidth_gbps,
        intra_gbps=1.0,
        stage_link_gbps=1.0,
        **ask.sizes,
    )
    reason = f"runs on the CPU; {memory.total:.1f} of {device.free_gb:.0f} GB of RAM"
    return Plan(profile, ask.dtype, layout, "lightweight", True, reason, [(node, slot)], memory, rate, 0, 1)
