"""Memory one GPU needs to evaluate a model under a layout (tp, pp), term by term, in GiB.

For an evaluation with batch size B and maximum length S (tokens T = B*S), dtype of b bytes
per parameter, tensor-parallel degree tp and pipeline degree pp, the worst pipeline stage s
(holding n_s of the L layers, stages balanced by layer count) needs on each of its GPUs:

    weights     = (n_s * P_layer + E_s) * b / tp
                  E_s: embeddings on the first stage; final norm and lm_head on the last
                  (a tied lm_head costs a second copy there when pp > 1)
    kv_cache    = T * n_s * 2 * ceil(kv_heads / tp) * head_dim * b_kv
                  (kv heads fewer than tp are replicated; b_kv = b, at least 2 bytes)
    activations = T * b * (3*H + max(2*I_active, (heads + 2*kv_heads)*head_dim) / tp)
                  one layer's hidden states and widest projection at a time (inference frees
                  each layer's tensors), with fused attention (no S^2 score matrix)
                + B * C * V * 4 * 2 on the last stage: float32 logits and log-softmax over the
                  vocabulary V for the C = min(S, 256) continuation positions that are scored
    overhead    = 0.75 (CUDA context, cuBLAS workspace, allocator reserve)
                + 0.125 * tp when tp > 1 (NCCL buffers, one set per peer) + 0.125 when pp > 1
                  On the CPU: 1.0 for the process and its libraries, nothing for communication.
    margin      = 5% of (weights + kv_cache + activations), for fragmentation
    total       = the sum; the layout fits where total <= the GPU's free memory.

Calibration: Llama-3.1-8B in bf16 gives 14.96 GiB of weights, 0.2% below the 14.99 GiB vLLM
reports after loading it. The overhead and margin constants are estimates, not measurements here:
a CUDA context with cuBLAS typically takes 0.5-1 GiB on A100/H100, and NCCL allocates buffers per
peer; re-fit them against `torch.cuda.max_memory_allocated` on real GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

from evalfleet.planning.model_profile import GIB, ModelProfile

CONTINUATION_TOKENS = 256
CUDA_CONTEXT_GB = 0.75
CPU_PROCESS_GB = 1.0
COMM_GB_PER_TP_PEER = 0.125
PP_BUFFERS_GB = 0.125
MARGIN = 0.05


@dataclass(frozen=True)
class MemoryBreakdown:
    """Per-GPU memory of the worst pipeline stage, in GiB."""

    weights: float
    kv_cache: float
    activations: float
    overhead: float
    margin: float
    total: float

    def to_dict(self) -> dict[str, float]:
        return {
            "weights": round(self.weights, 2),
            "kv_cache": round(self.kv_cache, 2),
            "activations": round(self.activations, 2),
            "overhead": round(self.overhead, 2),
            "margin": round(self.margin, 2),
            "total": round(self.total, 2),
        }


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Layers per stage, as even as possible; extra layers go to middle stages, then the first
    (an embedding lookup costs no compute), never first to the last, which also computes the logits."""
    base, extra = divmod(num_layers, pp)
    counts = [base] * pp
    order = list(range(1, pp - 1)) + [0, pp - 1]
    for stage in order[:extra]:
        counts[stage] += 1
    return counts


class MemoryModel:
    """The formula above for one model and workload, with the layout-independent parts computed once
    (the planner sizes dozens of layouts per plan)."""

    def __init__(
        self,
        profile: ModelProfile,
        *,
        dtype: str = "bfloat16",
        max_length: int = 2048,
        batch_size: int = 8,
        on_cpu: bool = False,
    ) -> None:
        self.profile, self.on_cpu = profile, on_cpu
        self.bytes = b = profile.bytes_per_param(dtype)
        tokens = batch_size * max_length
        self.kv_per_head_layer = tokens * 2 * profile.head_dim * max(b, 2.0)
        widest = max(
            2 * profile.intermediate_size * max(profile.experts_per_token, 1),
            (profile.num_heads + 2 * profile.num_kv_heads) * profile.head_dim,
        )
        self.hidden = tokens * b * 3 * profile.hidden_size
        self.widest = tokens * b * widest
        self.logits = batch_size * min(max_length, CONTINUATION_TOKENS) * profile.vocab_size * 8
        self.head_copy = profile.vocab_size * profile.hidden_size if profile.tie_word_embeddings else 0

    def __call__(self, tp: int = 1, pp: int = 1) -> MemoryBreakdown:
        profile, b = self.profile, self.bytes
        kv_per_layer = self.kv_per_head_layer * -(-profile.num_kv_heads // tp)
        layer_activations = self.hidden + self.widest / tp
        base, extra = divmod(profile.num_layers, pp)
        if pp == 1:
            stages = [(base, profile.embedding_params + profile.head_params, self.logits)]
        else:
            first = base + (1 if extra > pp - 2 else 0)
            stages = [(first, profile.embedding_params, 0.0), (base, profile.head_params + self.head_copy, self.logits)]
            if pp > 2:
                stages.append((base + (1 if extra else 0), 0, 0.0))
        worst, worst_sum = (0.0, 0.0, 0.0), -1.0
        for layers, ends, logit_bytes in stages:
            candidate = (
                (layers * profile.params_per_layer + ends) * b / tp,
                layers * kv_per_layer,
                layer_activations + logit_bytes,
            )
            if sum(candidate) > worst_sum:
                worst, worst_sum = candidate, sum(candidate)
        weights, kv_cache, activations = (value / GIB for value in worst)
        if self.on_cpu:
            overhead = CPU_PROCESS_GB
        else:
            overhead = (
                CUDA_CONTEXT_GB + (COMM_GB_PER_TP_PEER * tp if tp > 1 else 0.0) + (PP_BUFFERS_GB if pp > 1 else 0.0)
            )
        margin = MARGIN * (weights + kv_cache + activations)
        return MemoryBreakdown(
            weights, kv_cache, activations, overhead, margin, weights + kv_cache + activations + overhead + margin
        )


def device_map_budgets(per_gpu: MemoryBreakdown, free_gb: list[float]) -> list[int]:
    """Bytes of weights each GPU of a device_map replica may take (accelerate's `max_memory`): its
    free memory less what the memory model sets aside beside the weights (KV cache, activations,
    overhead, margin) on the worst stage."""
    reserve = per_gpu.total - per_gpu.weights
    return [max(0, int((free - reserve) * GIB)) for free in free_gb]


def estimate_memory(
    profile: ModelProfile,
    tp: int = 1,
    pp: int = 1,
    *,
    dtype: str = "bfloat16",
    max_length: int = 2048,
    batch_size: int = 8,
    on_cpu: bool = False,
) -> MemoryBreakdown:
    """Per-GPU memory of `profile` under tp x pp for this workload (the module docstring's formula)."""
    return MemoryModel(profile, dtype=dtype, max_length=max_length, batch_size=batch_size, on_cpu=on_cpu)(tp, pp)
