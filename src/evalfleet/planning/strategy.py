"""Parallel layouts, the rules a layout must obey, and the cost model that ranks them.

Cost model, for one replica (a tp x pp group) evaluating a batch of B sequences of S tokens:
the batch is cut into m micro-batches (m = B when pp > 1, else 1) that flow through the stages,
so the batch takes (m + pp - 1) micro-steps, each as long as one stage's share of a micro-batch:

    compute   = FLOPs(micro-batch) / (tp * pp * peak bf16 FLOP/s * efficiency)
    floor     = stage weights / memory bandwidth        (each micro-step reads its weights once)
    all-reduce= layers per stage * 2 * (2 (tp-1)/tp * activation bytes / link GB/s + latency)
    p2p       = activation bytes / link GB/s between stages (NVLink/PCIe, or the network across nodes)

    tokens/s  = B * S / ((m + pp - 1) * (max(compute, floor) + all-reduce + p2p))

The job's throughput is dp times a replica's; AUTO picks the layout that maximises it.
"""

from __future__ import annotations

from dataclasses import dataclass

from evalfleet.planning.model_profile import ModelProfile, PlanningError
from evalfleet.types import DistributionStrategy

__all__ = ["DistributionStrategy", "ParallelLayout", "layout_problem", "replica_tokens_per_s", "to_strategy"]

COMPUTE_EFFICIENCY = 0.45
COLLECTIVE_LATENCY_S = 10e-6


@dataclass(frozen=True)
class ParallelLayout:
    """tp GPUs share each layer, pp stages split the layers, dp replicas split the data."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanningError(f"{name} must be a positive whole number, not {value!r}")

    @property
    def world_size(self) -> int:
        """GPUs in one replica."""
        return self.tp * self.pp

    @property
    def total_gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def strategy(self) -> DistributionStrategy:
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


def shape_allowed(strategy: DistributionStrategy, tp: int, pp: int) -> bool:
    """Whether a replica of tp x pp GPUs is of the kind a forced strategy asks for."""
    if strategy is DistributionStrategy.AUTO:
        return True
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


def replica_tokens_per_s(
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
) -> float:
    """Evaluation tokens per second of one replica (see the module docstring)."""
    b = profile.bytes_per_param(dtype)
    micro = batch_size if pp > 1 else 1
    micro_tokens = batch_size * max_length / micro
    flops = profile.flops_per_token(context=max_length // 2) * micro_tokens
    compute = flops / (tp * pp * tflops * 1e12 * COMPUTE_EFFICIENCY)
    floor = profile.params * b / (tp * pp) / (memory_bandwidth_gbps * 1e9)
    activation_bytes = micro_tokens * profile.hidden_size * max(b, 2.0)
    step = max(compute, floor)
    if tp > 1:
        ring = 2 * (tp - 1) / tp * activation_bytes / (intra_gbps * 1e9) + COLLECTIVE_LATENCY_S
        step += 2 * -(-profile.num_layers // pp) * ring
    if pp > 1:
        step += activation_bytes / (stage_link_gbps * 1e9) + COLLECTIVE_LATENCY_S
    return batch_size * max_length / ((micro + pp - 1) * step)
