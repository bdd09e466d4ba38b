"""What a job asks of the pool, in the terms the scheduling policy reasons with, and how a request
becomes it.

A `JobDemand` is the shape of one replica (tp x pp GPUs), how many data-parallel replicas
the job can use, how much work is left, and how fast k replicas do it. The replica shape and
the memory each GPU needs are the planner's; the throughput of k replicas is the planner's
estimate for the layout (tp, pp, dp=k), asked once per k, so the scheduler and the simulator
never invent a speed of their own. The work is the job's size (`engines/job_size.py`: counted
from lm-eval's requests and the model's tokenizer, no model run, else modeled, and the size
says which).

The speed is the measured one where a finished run of the same model shape, backend, dtype,
layout and hardware left one (`planning/calibration.py`), else the cost model's, and the
job's `estimate` (kept in its plan) says which, with both figures: the planner's rates per
replica count are scaled by the measured-over-modeled ratio of the job's own layout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from evalfleet.planning import GPU, Inventory, Node, Plan, plan, profile_model
from evalfleet.planning.calibration import (
    CalibrationKey,
    cpu_hardware,
    inventory_hardware,
    job_estimate,
    kind_estimates,
    model_shape,
    modeled_rates,
    plan_speeds,
    slot_threads,
)
from evalfleet.planning.hardware import CPU_SPEC, CPU_TFLOPS_PER_CORE
from evalfleet.types import DistributionStrategy, EvalfleetError, EvaluationRequest, UsageError

Device = tuple[int, int]
PRIORITY_RANK = {"low": 0, "normal": 1, "high": 2}


@dataclass(frozen=True)
class JobDemand:
    model: str
    work_tokens: float
    tokens_per_s: tuple[float, ...]
    """Estimated throughput with 1, 2, ... replicas; its length is the most replicas the job can use."""
    tp: int = 1
    pp: int = 1
    min_replicas: int = 1
    startup_s: float = 60.0
    """Seconds before the first token: process start, task building, weight loading from storage."""
    warm_startup_s: float = 20.0
    """The same when the node already holds the weights (page cache): model affinity pays off here."""
    need_gb: float = 0.0
    """Free memory each GPU of a replica needs (the planner's per-GPU total)."""
    avoid: tuple[Device, ...] = ()
    """Devices its last attempt failed on: placed elsewhere where the pool has room (see `recovery`)."""

    def __post_init__(self) -> None:
        if not self.tokens_per_s or any(t <= 0 for t in self.tokens_per_s):
            raise ValueError("tokens_per_s needs a positive throughput for each replica count")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is outside 1..{self.max_replicas}")
        if self.tp < 1 or self.pp < 1 or self.work_tokens < 0:
            raise ValueError("tp and pp must be at least 1 and work_tokens not negative")

    @property
    def max_replicas(self) -> int:
        return len(self.tokens_per_s)

    @property
    def replica_gpus(self) -> int:
        return self.tp * self.pp

    def runtime(self, replicas: int, *, warm: bool = False) -> float:
        startup = self.warm_startup_s if warm else self.startup_s
        return startup + self.work_tokens / self.tokens_per_s[replicas - 1]

    def gpu_seconds(self, replicas: int) -> float:
        return replicas * self.replica_gpus * self.runtime(replicas)

    def min_gpu_seconds(self) -> float:
        return min(self.gpu_seconds(k) for k in range(1, self.max_replicas + 1))

    def replicas_within(self, horizon_s: float) -> int:
        """The fewest replicas (from `min_replicas`) that finish within `horizon_s`, else the most."""
        for k in range(self.min_replicas, self.max_replicas + 1):
            if self.runtime(k) <= horizon_s:
                return k
        return self.max_replicas

    def with_work(self, work_tokens: float) -> JobDemand:
        return replace(self, work_tokens=max(0.0, work_tokens))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": list(self.tokens_per_s), "avoid": [list(d) for d in self.avoid]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobDemand:
        avoid = tuple(tuple(device) for device in data.get("avoid", ()))
        return cls(**{**data, "tokens_per_s": tuple(data["tokens_per_s"]), "avoid": avoid})


# Start-up costs for the runtime model: interpreter + lm-eval task building, then weights
# read at storage speed (cold) or from the node's page cache (warm), each GPU its own shard.
PROCESS_START_S = 45.0
COLD_READ_BYTES_PER_S = 1.5e9
WARM_READ_BYTES_PER_S = 12e9


def startup_seconds(weight_bytes: float, replica_gpus: int) -> tuple[float, float]:
    """(cold, warm) seconds from launch to the first batch for one replica's shard size."""
    shard = weight_bytes / replica_gpus
    return PROCESS_START_S + shard / COLD_READ_BYTES_PER_S, PROCESS_START_S + shard / WARM_READ_BYTES_PER_S



def slot_inventory(slots: int, memory_gb: float | None = None) -> Inventory:
    """A CPU-only pool of `slots` single-job slots (`--slots N`), as one node of CPU devices.

    Every slot offers the machine's whole RAM to the planner's fit check: slots bound how
    many jobs run at once, not how a model is split.
    """
    if slots < 1:
        raise UsageError(f"--slots must be at least 1, not {slots}")
    if memory_gb is None:
        memory_gb = Inventory.cpu().nodes[0].gpus[0].free_gb
    device = GPU("cpu", memory_gb, memory_gb, None, CPU_SPEC)
    return Inventory([Node([device] * slots, interconnect="cpu", intra_bandwidth_gbps=0.0, name="localhost")])


def describe_pool(inventory: Inventory) -> str:
    """`4xA10G-24GB`, or `2 CPU slots` for a slot pool."""
    if not inventory.is_cpu_only:
        return inventory.describe()
    slots = inventory.device_count
    return f"{slots} CPU slot{'s' if slots != 1 else ''}"


def throughput_by_replicas(layout_plan: Plan, inventory: Inventory) -> tuple[float, ...]:
    """The planner's tokens/s for 1, 2, ... up to the plan's dp replicas of its replica shape."""
    if inventory.is_cpu_only:
        return (layout_plan.estimated_tokens_per_s,)
    rates = []
    for k in range(1, layout_plan.layout.dp + 1):
        answer = plan(layout_plan.profile, inventory, dtype=layout_plan.dtype, max_length=layout_plan.max_length,
                      batch_size=layout_plan.batch_size, tp=layout_plan.layout.tp, pp=layout_plan.layout.pp,
                      dp=k, alternatives=0, backend=layout_plan.backend)
        if not answer.fits:
            break
        rates.append(answer.estimated_tokens_per_s)
    return tuple(rates)


def demand_from_plan(
    layout_plan: Plan, inventory: Inventory, *, work_tokens: float, model: str, min_replicas: int = 1
) -> JobDemand:
    """The scheduling view of a fitting plan: its replica shape, up to its dp replicas."""
    tp, pp = layout_plan.layout.tp, layout_plan.layout.pp
    rates = throughput_by_replicas(layout_plan, inventory)
    cold, warm = startup_seconds(layout_plan.profile.weight_bytes(layout_plan.dtype), tp * pp)
    return JobDemand(
        model=model, work_tokens=work_tokens, tokens_per_s=rates, tp=tp, pp=pp,
        min_replicas=min(min_replicas, len(rates)), startup_s=cold, warm_startup_s=warm,
        need_gb=0.0 if inventory.is_cpu_only else layout_plan.per_gpu.total,
    )


def size_request(request: EvaluationRequest, inventory: Inventory) -> tuple[dict, JobDemand, dict]:
    """The plan (as JSON), demand and size of a request; refuses one that can never fit the whole
    pool, or whose tasks are wrong (an unknown task, a malformed task folder)."""
    if request.gpus == 0 and not inventory.is_cpu_only:
        raise UsageError("the request allows 0 GPUs, so it can never run on this GPU pool")
    profile = profile_model(request.model.path)
    slots = _slot_replicas(request, inventory)
    hints = {"strategy": "auto"} if slots else {"strategy": request.strategy.value, "tp": request.tp,
                                                "pp": request.pp, "dp": request.dp}
    answer = plan(
        profile, inventory, dtype=inventory.load_dtype(request.model.dtype), max_length=request.model.max_length or 2048,
        max_gpus=request.gpus, backend=request.backend, **hints,
    )
    if not answer.fits:
        pool = describe_pool(inventory)
        raise EvalfleetError(f"{request.model.path} can never run on this pool ({pool}): {answer.reason}")
    if answer.layout.device_map and any(node.interconnect == "ray" for node in inventory.nodes):
        raise UsageError(f"{request.model.path} fits this pool only as a device_map (its layers over one node's "
                         f"GPUs in one process), which a Ray pool does not run; run it on one node with "
                         f"`evalfleet run`, or submit it to a scheduler of that node")
    from evalfleet.engines.job_size import job_size

    size = job_size(request)
    demand = demand_from_plan(answer, inventory, work_tokens=size["work_tokens"], model=request.model.path,
                              min_replicas=request.dp or 1)
    if slots:  # each replica on a slot of its own, as fast as the plan's one
        rate = demand.tokens_per_s[0]
        demand = replace(demand, tokens_per_s=tuple(rate * k for k in range(1, slots + 1)),
                         min_replicas=min(request.dp or 1, slots))
    estimate = estimate_request(request, inventory, answer, size)
    if estimate["seconds"] > 0:
        demand = calibrated(demand, estimate["modeled_seconds"] / estimate["seconds"])
    return {**answer.to_dict(), "estimate": estimate}, demand, size


def _slot_replicas(request: EvaluationRequest, inventory: Inventory) -> int:
    """On a pool of CPU slots, the most replicas a data-parallel job may run, one per slot (0: not one).

    With `dp` it runs exactly that many; without, between one and every slot (or `gpus` of them),
    and the scheduler widens and narrows it while it runs.
    """
    if not inventory.is_cpu_only or request.strategy is not DistributionStrategy.DATA_PARALLEL:
        return 0
    if request.tp not in (None, 1) or request.pp not in (None, 1):
        raise UsageError("on CPU slots a data-parallel job runs one whole model per slot; drop --tp and --pp")
    most = request.dp or min(inventory.device_count, request.gpus or inventory.device_count)
    if most > inventory.device_count:
        raise UsageError(f"--dp {most} needs {most} slots; the pool has {inventory.device_count}")
    return most


def calibrated(demand: JobDemand, measured_over_modeled: float) -> JobDemand:
    """The demand with the planner's speed for every replica count scaled by how fast runs of
    its key really were (1.0: nothing measured)."""
    if measured_over_modeled <= 0 or measured_over_modeled == 1.0:
        return demand
    return replace(demand, tokens_per_s=tuple(rate * measured_over_modeled for rate in demand.tokens_per_s))


def plan_demand(layout_plan: Plan, inventory: Inventory, *, work_tokens: float, model: str) -> JobDemand:
    """A job sized from a plan alone (the simulator's synthetic jobs: log-likelihood work): the
    planner's speeds, calibrated by measured runs of the plan's key as a submitted job's are."""
    demand = demand_from_plan(layout_plan, inventory, work_tokens=work_tokens, model=model)
    speed = plan_speeds(layout_plan, inventory)["by_kind"]["loglikelihood"]
    return calibrated(demand, speed.get("measured_over_modeled", 1.0))


def estimate_for(request: EvaluationRequest, inventory: Inventory) -> tuple[dict[str, Any], dict[str, Any]]:
    """(estimate, size) of a request run outside the scheduler: on the CPU its layout comes from
    its hints, as the distributed engine makes them concrete (the planner never splits a model
    on the CPU), so only the model's fit is planned here."""
    from evalfleet.engines.job_size import job_size

    profile = profile_model(request.model.path)
    cpu_hints = inventory.is_cpu_only
    answer = plan(
        profile, inventory, dtype=inventory.load_dtype(request.model.dtype), max_length=request.model.max_length or 2048,
        strategy="auto" if cpu_hints else request.strategy.value, tp=None if cpu_hints else request.tp,
        pp=None if cpu_hints else request.pp, dp=None if cpu_hints else request.dp, backend=request.backend,
    )
    if not answer.fits:
        raise EvalfleetError(f"{request.model.path} does not fit {describe_pool(inventory)}: {answer.reason}")
    size = job_size(request)
    return estimate_request(request, inventory, answer, size), size


def _run_layout(request: EvaluationRequest, inventory: Inventory, answer: Plan) -> tuple[int, int, int, str, float]:
    """(tp, pp, dp, hardware key, TFLOP/s per rank) of the run this request will be: the plan's
    layout on GPUs; on the CPU the hints made concrete as the distributed engine does, with the
    threads each rank gets."""
    if not inventory.is_cpu_only:
        device = inventory.nodes[0].gpus[0]
        layout = answer.layout
        return layout.tp, layout.pp, layout.dp, inventory_hardware(inventory), device.spec.bf16_tflops
    from evalfleet.engines.router import wants_distribution

    if _slot_replicas(request, inventory):  # one replica on a slot (it may widen while it runs)
        threads = slot_threads(inventory)
        return 1, 1, 1, cpu_hardware(threads), threads * CPU_TFLOPS_PER_CORE
    if wants_distribution(request):
        from evalfleet.engines.distributed.loader import cpu_layout

        worker = cpu_layout(request.strategy, request.tp, request.pp, request.dp)
        ranks = worker.tp * worker.pp * worker.dp
        return (worker.tp, worker.pp, worker.dp, cpu_hardware(worker.threads * ranks),
                worker.threads * CPU_TFLOPS_PER_CORE)
    if inventory.device_count > 1:  # a scheduler slot: the cores its jobs are given
        threads = slot_threads(inventory)
    else:  # the lightweight engine takes the cores free now (runtime/threads.py)
        from evalfleet.runtime.threads import run_threads

        threads = run_threads()
    return 1, 1, 1, cpu_hardware(threads), threads * CPU_TFLOPS_PER_CORE


def estimate_request(request: EvaluationRequest, inventory: Inventory, answer: Plan, size: dict[str, Any]) -> dict[str, Any]:
    """The job's compute seconds: measured speeds of its key where there are some, else modeled."""
    from evalfleet.runtime.batching import DEFAULT_TOKEN_BUDGET

    tp, pp, dp, hardware, tflops = _run_layout(request, inventory, answer)
    node = inventory.nodes[0]
    work = dict(size.get("work_tokens_by_kind") or {"loglikelihood": size["work_tokens"]})
    # The job's own sequences where they were counted (attention over half of one, on average),
    # and as many rows per batch as the token budget holds (pp budgets for a pipeline).
    length = size["work_tokens"] / size["token_requests"] if size.get("token_requests") else answer.max_length
    device_map = answer.layout.device_map and not inventory.is_cpu_only  # its stages run in turn: no pp budgets
    budget = request.max_batch_tokens or DEFAULT_TOKEN_BUDGET["cpu" if inventory.is_cpu_only else "cuda"] * (
        1 if device_map else pp)
    rates = modeled_rates(
        answer.profile, tp, pp, dp, tflops=tflops, bandwidth_gbps=node.gpus[0].spec.memory_bandwidth_gbps,
        link_gbps=node.intra_bandwidth_gbps or 1.0, dtype=answer.dtype, max_length=max(1, round(length)),
        batch_size=max(1, int(budget // max(length, 1))), device_map=device_map,
    )
    generated = float(size.get("generation_tokens") or 0)
    generation = float(work.get("generation", 0))
    modeled = {"loglikelihood": rates["prefill"], "generation": rates["decode"]}
    if generation > 0:  # its prompts at prefill speed, its budget at decode speed
        modeled["generation"] = generation / ((generation - generated) / rates["prefill"] + generated / rates["decode"])
    # answer.dtype: the one its ranks will load (the plan was sized in `Inventory.load_dtype`'s answer)
    key = CalibrationKey(model_shape(answer.profile), answer.backend, answer.dtype, tp, pp, dp, hardware)
    return {**job_estimate(work, kind_estimates(key, modeled)), "key": key.describe()}
