"""Parallel layouts, the rules a layout must obey, and the cost model that ranks them.

Cost model, for one replica (a tp x pp group) evaluating a batch of B sequences of S tokens:
the batch is cut into m micro-batches of ceil(B / m) rows that flow through the stages, as the
runtime does (`microbatches`: m about 8 per stage, m = 1 when pp = 1), so the batch takes
(m + pp - 1) micro-steps, each as long as one stage's share of a micro-batch:

    compute   = FLOPs(micro-batch) / (tp * pp * peak bf16 FLOP/s * efficiency)
    floor     = stage weights / memory bandwidth        (each micro-step reads its weights once)
    all-reduce= layers per stage * 2 * (2 (tp-1)/tp * activation bytes / link GB/s + latency)
    p2p       = activation bytes / link GB/s between stages (NVLink/PCIe, or the network across nodes)

    tokens/s  = B * S / ((m + pp - 1) * (max(compute, floor) + all-reduce + p2p))

The job's throughput is dp times a replica's; AUTO picks the layout that maximises it.

Decoding (the generation budget) is a second term: each step adds one token to each of the B
rows, the stages run one after another (generation keeps transformers' own pp forward), and a
step reads every weight once, so

    decode step = max(FLOPs(B tokens) / (tp * peak * efficiency), weights / (tp * bandwidth))
                  + layers * host seconds per layer call + all-reduces (tp) + p2p (pp)
    decode tokens/s = B / decode step

A device_map replica (`ParallelLayout.device_map`: the layers split over pp GPUs of one node
inside one process, accelerate's `device_map` as lm-eval's `parallelize=True` makes it) has no
micro-batches: the whole batch goes through one GPU after the other, so one GPU computes at a
time and the replica runs at one GPU's speed over the whole model, plus a hop per boundary:

    batch     = max(FLOPs(batch) / (peak * efficiency), weights / bandwidth) + (pp - 1) * p2p(batch)

and decoding is the pp formula above (which already runs the stages one after another).

Both are models: `planning/calibration.py` replaces them by measured speeds once a run of the
same shape, layout and hardware has finished, and reports the model's error against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evalfleet.planning.model_profile import ModelProfile, PlanningError
from evalfleet.types import DistributionStrategy

__all__ = [
    "DistributionStrategy", "ParallelLayout", "layout_problem", "microbatches", "replica_speeds", "replica_tokens_per_s", "to_strategy",
]

COMPUTE_EFFICIENCY = 0.45
COLLECTIVE_LATENCY_S = 10e-6
# Python and kernel-launch time per decoder layer per forward call in eager transformers; it
# bounds decoding of small models (measured by benchmarks/calibration.py, which reports it).
HOST_SECONDS_PER_LAYER = 1.5e-4
# Micro-batches per stage in a pipelined batch: the schedule's idle share ("bubble") is
# (stages - 1) / (micro-batches + stages - 1), 1/17 of a 2-stage pipeline at 8 per stage. On the
# CPU benchmark (benchmarks/distributed_cpu.py) 8 beat 4 by 5-15%.
MICROBATCHES_PER_STAGE = 8


def microbatches(rows: int, stages: int, per_stage: int = MICROBATCHES_PER_STAGE) -> tuple[int, int]:
    """(rows per micro-batch, micro-batches) for a batch of `rows` over `stages`, as the
    pipelined runtime cuts it (`runtime.parallel.PipelinedHFBackend`).

    All micro-batches have one size (a pipeline stage has one shape), so a batch that does not
    divide evenly gets repeated filler rows. Between `per_stage` x `stages` and half that, the
    count with the least pipeline time wins: (count + stages - 1) steps of `size` rows each.
    """
    wanted = min(rows, per_stage * stages) if stages > 1 else 1
    if wanted < 2:
        return rows, 1
    count = min(range(wanted, max(2, wanted // 2) - 1, -1), key=lambda n: (n + stages - 1) * -(-rows // n))
    return -(-rows // count), count


@dataclass(frozen=True)
class ParallelLayout:
    """tp GPUs share each layer, pp stages split the layers, dp replicas split the data.

    With `device_map`, a replica's pp stages are pp GPUs of one node held by one process, which
    runs them one after another (accelerate's device_map): no tensor parallelism, no pipelining.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    device_map: bool = False

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanningError(f"{name} must be a positive whole number, not {value!r}")
        if self.device_map and (self.tp > 1 or self.pp < 2):
            raise PlanningError(f"a device_map split has tp=1 and pp of 2 or more, not tp={self.tp}, pp={self.pp}")

    @property
    def world_size(self) -> int:
        """GPUs in one replica."""
        return self.tp * self.pp

    @property
    def total_gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def strategy(self) -> DistributionStrategy:
        if self.device_map:
            return DistributionStrategy.DEVICE_MAP
        if self.tp > 1 and self.pp > 1:
            return DistributionStrategy.HYBRID
        if self.tp > 1:
            return DistributionStrategy.TENSOR_PARALLEL
        if self.pp > 1:
            return DistributionStrategy.PIPELINE_PARALLEL
        if self.dp > 1:
            return DistributionStrategy.DATA_PARALLEL
        return DistributionStrategy.SINGLE


def to_strategy(value: DistributionStrategy | str) -> DistributionStrategy:
    if isinstance(value, DistributionStrategy):
        return value
    try:
        return DistributionStrategy(str(value).strip().lower())
    except ValueError:
        names = ", ".join(s.value for s in DistributionStrategy)
        raise PlanningError(f"unknown strategy '{value}'; use one of {names}") from None


def shape_allowed(strategy: DistributionStrategy, tp: int, pp: int, device_map: bool = False) -> bool:
    """Whether a replica of tp x pp GPUs (split by a device_map or not) is of the kind a forced strategy asks for."""
    if strategy is DistributionStrategy.AUTO:
        return True
    if device_map or strategy is DistributionStrategy.DEVICE_MAP:
        return device_map and strategy is DistributionStrategy.DEVICE_MAP
    if strategy in (DistributionStrategy.SINGLE, DistributionStrategy.DATA_PARALLEL):
        return tp == 1 and pp == 1
    if strategy is DistributionStrategy.TENSOR_PARALLEL:
        return tp > 1 and pp == 1
    if strategy is DistributionStrategy.PIPELINE_PARALLEL:
        return tp == 1 and pp > 1
    return tp > 1 and pp > 1


def layout_problem(profile: ModelProfile, tp: int, pp: int) -> str | None:
    """Why the model cannot be split this way, or None."""
    if profile.num_heads % tp:
        return f"tp={tp} does not divide the {profile.num_heads} attention heads"
    kv = profile.num_kv_heads
    if kv % tp and tp % kv:
        return f"tp={tp} neither divides the {kv} KV heads nor is a multiple of them (to replicate them)"
    if pp > profile.num_layers:
        return f"pp={pp} exceeds the {profile.num_layers} layers"
    return None


def replica_tokens_per_s(profile: ModelProfile, tp: int, pp: int, **figures: Any) -> float:
    """Evaluation (prompt) tokens per second of one replica (see the module docstring)."""
    return replica_speeds(profile, tp, pp, **figures)[0]


def replica_speeds(
    profile: ModelProfile,
    tp: int,
    pp: int,
    *,
    dtype: str,
    max_length: int,
    batch_size: int,
    tflops: float,
    memory_bandwidth_gbps: float,
    intra_gbps: float,
    stage_link_gbps: float,
    device_map: bool = False,
) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) of one replica, B rows of S tokens (module docstring);
    `device_map`: its pp stages in one process, one after another."""
    b = profile.bytes_per_param(dtype)
    peak = tp * tflops * 1e12 * COMPUTE_EFFICIENCY

    def ring(activation_bytes: float) -> float:  # one all-reduce over the tp group
        return 2 * (tp - 1) / tp * activation_bytes / (intra_gbps * 1e9) + COLLECTIVE_LATENCY_S

    def hop(activation_bytes: float) -> float:  # one stage boundary
        return activation_bytes / (stage_link_gbps * 1e9) + COLLECTIVE_LATENCY_S

    size, micro = (batch_size, 1) if device_map else microbatches(batch_size, pp)
    micro_tokens = size * max_length
    compute = profile.flops_per_token(context=max_length // 2) * micro_tokens / (pp * peak)
    floor = profile.params * b / (tp * pp) / (memory_bandwidth_gbps * 1e9)
    activation_bytes = micro_tokens * profile.hidden_size * max(b, 2.0)
    if device_map:  # every stage in turn on the whole batch: one GPU's speed, plus the hops between them
        batch_seconds = pp * max(compute, floor) + (pp - 1) * hop(activation_bytes)
        prefill = batch_size * max_length / batch_seconds
    else:
        step = max(compute, floor)
        if tp > 1:
            step += 2 * -(-profile.num_layers // pp) * ring(activation_bytes)
        if pp > 1:
            step += hop(activation_bytes)
        prefill = batch_size * max_length / ((micro + pp - 1) * step)

    decode_compute = profile.flops_per_token(context=max_length // 2) * batch_size / peak
    weights = profile.params * b / tp / (memory_bandwidth_gbps * 1e9)
    decode_step = max(decode_compute, weights) + profile.num_layers * HOST_SECONDS_PER_LAYER
    row_bytes = batch_size * profile.hidden_size * max(b, 2.0)
    if tp > 1:
        decode_step += 2 * profile.num_layers * ring(row_bytes)
    if pp > 1:
        decode_step += (pp - 1) * hop(row_bytes)
    return prefill, batch_size / decode_step
