"""From a model and a request's hints to running worker groups: layout, placement, load.

On GPUs the planner decides (`planning.plan`): layout, which (node, gpu) runs each rank, and
whether it fits. On the CPU the planner sees one device and refuses to split, yet splitting
a model over processes on the CPU is how the distributed paths are tested, and data
parallelism over cores is simply faster there; so CPU layouts come from the hints (or one
replica per core for `auto`), every rank on "cpu" with an equal share of the cores.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field
from typing import Any

from evalfleet.engines.distributed.vllm_layout import gpu_memory_utilization, vllm_spec_fields
from evalfleet.planning.memory import device_map_budgets
from evalfleet.planning.strategy import ParallelLayout
from evalfleet.runtime.backends.hf import resolve_device, resolve_dtype
from evalfleet.runtime.group import GroupSpec
from evalfleet.runtime.transport import CommunicationCallback
from evalfleet.runtime.workers import (
    BATCH_TIMEOUT_S,
    EngineStatsCallback,
    LoadOutOfMemory,
    StepCallback,
    WorkerGroupRunner,
    loaded_dtype,
)
from evalfleet.types import DistributionStrategy, EvalfleetError, ModelConfig, ResourceError, resolve_model_path

# Degrees a forced strategy gets on the CPU when the request names none.
CPU_DEFAULT_DEGREE = 2


@dataclass(frozen=True)
class WorkerLayout:
    """A layout placed on this machine: each replica's devices, rank by rank."""

    tp: int
    pp: int
    dp: int
    devices: tuple[tuple[str, ...], ...]
    placement: tuple[tuple[int, int], ...] = ()
    threads: int = 1
    reason: str = ""
    # For vLLM, from the planner's memory model: its share of each GPU, and the longest sequence.
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    # A device_map replica (one process over its pp GPUs): bytes of weights each of its GPUs may take.
    device_map_budgets: tuple[int, ...] = ()

    @property
    def device_map(self) -> bool:
        return bool(self.device_map_budgets)

    @property
    def strategy(self) -> DistributionStrategy:
        return ParallelLayout(self.tp, self.pp, self.dp, device_map=self.device_map).strategy

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def placement_lists(self) -> list[list[Any]]:
        """(node, gpu) per rank from the planner, else each rank's device name."""
        if self.placement:
            return [list(device) for device in self.placement]
        return [[device] for replica in self.devices for device in replica]


@dataclass
class DistributedModelInfo:
    """A model loaded over worker groups: where each rank runs and what it holds."""

    model_path: str
    dtype: str
    layout: WorkerLayout
    parallel_path: str
    max_length: int
    load_seconds: float
    parameters_per_rank: list[int]
    parameter_bytes_per_rank: list[int]
    memory_bytes_per_rank: list[int]
    runner: WorkerGroupRunner = field(repr=False, compare=False)

    @property
    def parameter_bytes(self) -> int:
        """Bytes of weights over all replicas (each replica holds the whole model)."""
        return sum(self.parameter_bytes_per_rank) * self.layout.dp

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path,
            "dtype": self.dtype,
            "strategy": self.layout.strategy.value,
            "tp": self.layout.tp,
            "pp": self.layout.pp,
            "dp": self.layout.dp,
            "placement": self.layout.placement_lists(),
            "threads_per_rank": self.layout.threads,
            "parallel_path": self.parallel_path,
            "max_length": self.max_length,
            "load_seconds": round(self.load_seconds, 3),
            "parameters_per_rank": self.parameters_per_rank,
            "parameter_bytes_per_rank": self.parameter_bytes_per_rank,
            "memory_bytes_per_rank": self.memory_bytes_per_rank,
        }


def _cpu_cores() -> int:
    """The cores this run may use: its share when a scheduler's slot gave it one, else its affinity."""
    share = os.environ.get("EVALFLEET_THREADS", "")
    if share.isdigit():
        return max(1, int(share))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cpu_layout(strategy: DistributionStrategy, tp: int | None, pp: int | None, dp: int | None) -> WorkerLayout:
    """The hints made concrete on the CPU: forced strategies get degree 2, `auto` one replica per core."""
    cores = _cpu_cores()
    default = CPU_DEFAULT_DEGREE
    if strategy is DistributionStrategy.DEVICE_MAP:
        raise EvalfleetError("the device_map layout splits a model over a node's GPUs, and the CPU is one device; "
                             "use --strategy single, dp, tp or pp on the CPU")
    if strategy is DistributionStrategy.SINGLE:
        if max(tp or 1, pp or 1, dp or 1) > 1:
            raise EvalfleetError("strategy 'single' cannot take --tp, --pp or --dp above 1")
        tp, pp, dp = 1, 1, 1
    elif strategy is DistributionStrategy.TENSOR_PARALLEL:
        tp, pp = tp or default, pp or 1
    elif strategy is DistributionStrategy.PIPELINE_PARALLEL:
        tp, pp = tp or 1, pp or default
    elif strategy is DistributionStrategy.HYBRID:
        tp, pp = tp or default, pp or default
    elif strategy is DistributionStrategy.DATA_PARALLEL:
        dp = dp or max(cores, default)
    elif tp is None and pp is None and dp is None:
        dp = cores
    tp, pp, dp = tp or 1, pp or 1, dp or 1
    wrong = {
        DistributionStrategy.TENSOR_PARALLEL: tp < 2,
        DistributionStrategy.PIPELINE_PARALLEL: pp < 2,
        DistributionStrategy.HYBRID: tp < 2 or pp < 2,
        DistributionStrategy.DATA_PARALLEL: dp < 2,
    }
    if wrong.get(strategy, False):
        raise EvalfleetError(f"strategy '{strategy.value}' needs its degree above 1, got tp={tp}, pp={pp}, dp={dp}")
    ranks = tp * pp * dp
    devices = tuple(("cpu",) * (tp * pp) for _ in range(dp))
    reason = f"{ranks} process{'es' if ranks > 1 else ''} on {cores} CPU core{'s' if cores > 1 else ''}"
    return WorkerLayout(tp, pp, dp, devices, threads=max(1, cores // ranks), reason=reason)


def gpu_layout(plan: Any, inventory: Any = None) -> WorkerLayout:
    """A planner `Plan` as worker devices; worker groups run on this node only."""
    if not plan.fits:
        raise EvalfleetError(f"no layout fits: {plan.reason}")
    nodes = {node for node, _ in plan.placement}
    if len(nodes) > 1:
        raise EvalfleetError(
            f"the layout spans {len(nodes)} nodes; this engine runs worker groups on one node "
            "(submit the job to the scheduler for several nodes)"
        )
    layout = plan.layout
    devices = [f"cuda:{gpu}" for _, gpu in plan.placement]
    size = layout.tp * layout.pp
    replicas = tuple(tuple(devices[r * size : (r + 1) * size]) for r in range(layout.dp))
    budgets: tuple[int, ...] = ()
    if layout.device_map:  # the same limits for every replica: its GPUs' least free memory, place by place
        placed = [plan.placement[r * size : (r + 1) * size] for r in range(layout.dp)]
        free = [
            min(inventory.nodes[n].gpus[g].free_gb for n, g in column) if inventory is not None else plan.per_gpu.total
            for column in zip(*placed, strict=True)
        ]
        budgets = tuple(device_map_budgets(plan.per_gpu, free))
    return WorkerLayout(
        layout.tp,
        layout.pp,
        layout.dp,
        replicas,
        tuple(plan.placement),
        1,
        plan.reason,
        gpu_memory_utilization(plan, inventory) if inventory is not None else None,
        getattr(plan, "max_length", 0) or None,
        budgets,
    )


def visible_inventory() -> Any:
    """This machine's GPUs as the planner sees them, cut to CUDA_VISIBLE_DEVICES when it is set.

    NVML lists every GPU of the node whatever CUDA_VISIBLE_DEVICES says; a job given some GPUs
    (by a scheduler) must plan on those alone, numbered as the workers will count them.
    """
    import torch

    from evalfleet.planning import Inventory

    inventory = Inventory.detect()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or inventory.is_cpu_only or len(inventory.nodes) != 1:
        return inventory
    node = inventory.nodes[0]
    keep = [int(v) for v in visible.split(",") if v.strip().isdigit()]
    if len(node.gpus) > torch.cuda.device_count() and all(index < len(node.gpus) for index in keep):
        node.gpus = [node.gpus[index] for index in keep]  # NVML counted them all
    return inventory


def next_larger_plan(plan: Any, failed_world_size: int) -> Any | None:
    """The planner's best alternative with more GPUs per replica than the one that ran out of memory."""
    larger = [alt for alt in getattr(plan, "alternatives", []) if alt.layout.tp * alt.layout.pp > failed_world_size]
    return min(larger, key=lambda alt: alt.layout.tp * alt.layout.pp, default=None)


class MultiGPUModelLoader:
    """Chooses a layout (the planner on GPUs), places it, and loads the model over worker groups."""

    def __init__(
        self,
        inventory: Any = None,
        *,
        max_restarts: int = 2,
        batch_timeout: float = BATCH_TIMEOUT_S,
        on_communication: CommunicationCallback | None = None,
        on_step: StepCallback | None = None,
        on_engine_stats: EngineStatsCallback | None = None,
    ) -> None:
        self._inventory = inventory
        self.on_engine_stats = on_engine_stats
        self.max_restarts = max_restarts
        self.batch_timeout = batch_timeout
        self.on_communication = on_communication
        self.on_step = on_step

    @property
    def inventory(self) -> Any:
        if self._inventory is None:
            self._inventory = visible_inventory()
        return self._inventory

    def free_caches(self) -> None:
        """Hand memory that nothing references back to the devices."""
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def optimize_memory_usage(self, model_config: ModelConfig) -> str:
        """The dtype a rank on this process's device loads in (bfloat16 where the GPU runs it, else
        float16; float32 on the CPU), after freeing caches. Ranks decide for their own device."""
        self.free_caches()
        return resolve_dtype(model_config.dtype, resolve_device(model_config.device))

    def plan(
        self,
        model_config: ModelConfig,
        *,
        strategy: DistributionStrategy | str = DistributionStrategy.AUTO,
        tp: int | None = None,
        pp: int | None = None,
        dp: int | None = None,
        max_gpus: int | None = None,
        busy: Any = (),
        backend: str = "hf",
    ) -> Any:
        """The planner's answer for this model on this machine's GPUs, for layouts `backend` runs."""
        from evalfleet.planning import plan, profile_model

        profile = profile_model(model_config.path)
        dtype = self.inventory.load_dtype(model_config.dtype)  # the pool's answer, not this process's
        # vLLM sizes its engine for the model's whole context unless told otherwise, as lm-eval does.
        length = model_config.max_length or (profile.max_positions if backend == "vllm" else None) or 2048
        return plan(
            profile,
            self.inventory,
            dtype=dtype,
            strategy=strategy,
            tp=tp,
            pp=pp,
            dp=dp,
            max_gpus=max_gpus,
            busy=busy,
            max_length=length,
            backend=backend,
        )

    def determine_optimal_distribution_strategy(
        self,
        model_config: ModelConfig,
        *,
        strategy: DistributionStrategy | str = DistributionStrategy.AUTO,
        tp: int | None = None,
        pp: int | None = None,
        dp: int | None = None,
        max_gpus: int | None = None,
        backend: str = "hf",
    ) -> WorkerLayout:
        """The layout to run: the planner's on GPUs, the hints made concrete on the CPU."""
        strategy = DistributionStrategy(strategy)
        if resolve_device(model_config.device).startswith("cuda"):
            found = self.plan(model_config, strategy=strategy, tp=tp, pp=pp, dp=dp, max_gpus=max_gpus, backend=backend)
            return gpu_layout(found, self.inventory)
        if strategy is DistributionStrategy.AUTO and tp is None and pp is None and dp is None:
            # One vLLM engine already uses every core; transformers runs fastest as a replica per core.
            dp = 1 if backend == "vllm" else min(_cpu_cores(), self._replicas_in_ram(model_config))
        return cpu_layout(strategy, tp, pp, dp)

    def _replicas_in_ram(self, model_config: ModelConfig) -> int:
        """How many whole copies of the weights (with a fifth more for activations) the free RAM holds."""
        import psutil

        from evalfleet.planning import estimate_weights_gb, profile_model

        weights_gb = estimate_weights_gb(profile_model(model_config.path), "float32")
        return max(1, int(psutil.virtual_memory().available / 2**30 // max(weights_gb * 1.2, 1e-9)))

    def allocate_gpu_resources(self, tp: int, pp: int, dp: int, busy: Any = ()) -> list[tuple[int, int]]:
        """(node, gpu) for each rank of a tp x pp x dp layout on this machine (the planner's `place`)."""
        from evalfleet.planning import ParallelLayout, place

        return list(place(ParallelLayout(tp, pp, dp), self.inventory, busy))

    def load_model_distributed(
        self,
        model_config: ModelConfig,
        layout: WorkerLayout,
        *,
        share_prefixes: bool = False,
        env: dict[str, str] | None = None,
        backend: str = "hf",
        seed: int = 0,
    ) -> DistributedModelInfo:
        """Start the worker groups of `layout` and load the model in them.

        Out of memory while loading on GPUs retries with the planner's next larger layout
        when there is one; otherwise it is a clear error.
        """
        self.free_caches()
        while True:
            fields: dict[str, Any] = {
                "model_path": resolve_model_path(model_config.path),
                # as asked: each rank decides them on the device its replica gives it (GroupSpec.on_this_device)
                "dtype": model_config.dtype,
                "device": model_config.device,
                "tp": layout.tp,
                "pp": layout.pp,
                "threads": layout.threads,
                "max_length": model_config.max_length,
                "revision": model_config.revision,
                "trust_remote_code": model_config.trust_remote_code,
                "share_prefixes": share_prefixes and backend == "hf",
            }
            if layout.device_map:
                fields["max_memory"] = {str(i): size for i, size in enumerate(layout.device_map_budgets)}
            if backend == "vllm":
                fields.update(vllm_spec_fields(model_config, layout.tp, layout.pp, layout.gpu_memory_utilization,
                                               layout.max_model_len, seed))
            spec = GroupSpec(**fields)
            runner = WorkerGroupRunner(
                spec,
                [list(replica) for replica in layout.devices],
                max_restarts=self.max_restarts,
                batch_timeout=self.batch_timeout,
                on_communication=self.on_communication,
                on_step=self.on_step,
                placement=layout.placement_lists(),
                env=env,
                on_engine_stats=self.on_engine_stats,
            )
            began = time.perf_counter()
            try:
                runner.start()
                break
            except LoadOutOfMemory as error:
                larger = next_larger_plan(self.plan(model_config, backend=backend), layout.world_size) if layout.placement else None
                if larger is None:
                    raise ResourceError(
                        f"the model does not fit in memory with tp={layout.tp}, pp={layout.pp} "
                        f"({error}) and no larger layout is available"
                    ) from error
                layout = gpu_layout(larger, self.inventory)
        ranks = runner.info["ranks"]
        return DistributedModelInfo(
            model_path=spec.model_path,
            dtype=loaded_dtype(ranks, spec.dtype),
            layout=layout,
            parallel_path=spec.path,
            max_length=runner.max_length,
            load_seconds=time.perf_counter() - began,
            parameters_per_rank=[rank["parameters"] for rank in ranks],
            parameter_bytes_per_rank=[rank["parameter_bytes"] for rank in ranks],
            memory_bytes_per_rank=[rank["memory_bytes"] for rank in ranks],
            runner=runner,
        )
