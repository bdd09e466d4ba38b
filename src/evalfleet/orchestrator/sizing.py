"""From a request (or a planner `Plan`) to the `JobDemand` the scheduling policy works with.

The replica shape (tp x pp) and the memory each GPU needs are the planner's; the
throughput of k replicas is the planner's estimate for the layout (tp, pp, dp=k), asked
once per k, so the scheduler and the simulator never invent a speed of their own. The work is
the job's counted size (`engines/sizing.py`: lm-eval's requests and the model's tokenizer,
no model run) where it can be counted here, else a modeled figure, and the size says which.
"""

from __future__ import annotations

from evalfleet.orchestrator.demand import JobDemand, estimate_work_tokens, startup_seconds
from evalfleet.planning import GPU, Inventory, Node, Plan, plan, profile_model
from evalfleet.planning.hardware import CPU_SPEC
from evalfleet.types import EvalfleetError, EvaluationRequest, UsageError


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
    slots = sum(len(node.gpus) for node in inventory.nodes)
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
    answer = plan(
        profile, inventory, dtype=request.model.dtype, max_length=request.model.max_length or 2048,
        strategy=request.strategy.value, tp=request.tp, pp=request.pp, dp=request.dp, max_gpus=request.gpus,
        backend=request.backend,
    )
    if not answer.fits:
        pool = describe_pool(inventory)
        raise EvalfleetError(f"{request.model.path} can never run on this pool ({pool}): {answer.reason}")
    from evalfleet.engines.sizing import job_size

    size = job_size(request)
    if size["source"] != "counted":
        work = estimate_work_tokens(len(request.tasks.names), request.tasks.limit)
        size = {**size, "work_tokens": work,
                "model": "2,000 requests of 512 tokens per task (or --limit requests), before any count"}
    demand = demand_from_plan(answer, inventory, work_tokens=size["work_tokens"], model=request.model.path,
                              min_replicas=request.dp or 1)
    return answer.to_dict(), demand, size
