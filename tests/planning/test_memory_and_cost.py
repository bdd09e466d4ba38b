"""The memory model's terms and the cost model's trends."""

from __future__ import annotations

import pytest

from evalfleet.planning import estimate_memory, profile_model
from evalfleet.planning.memory import CONTINUATION_TOKENS, MARGIN
from evalfleet.planning.model_profile import GIB
from evalfleet.planning.strategy import layout_problem, replica_tokens_per_s


def test_weights_split_by_tensor_parallel_degree():
    profile = profile_model("meta-llama/Llama-2-70b-hf")
    one = estimate_memory(profile, 1, 1)
    assert one.weights == pytest.approx(profile.params * 2 / GIB)
    assert estimate_memory(profile, 4, 1).weights == pytest.approx(one.weights / 4)


def test_pipeline_stages_hold_their_layers_plus_the_ends():
    profile = profile_model("meta-llama/Llama-2-70b-hf")
    two = estimate_memory(profile, 1, 2)
    last_stage = 40 * profile.params_per_layer + profile.head_params
    first_stage = 40 * profile.params_per_layer + profile.embedding_params
    assert two.weights == pytest.approx(max(first_stage, last_stage) * 2 / GIB)


def test_tied_head_needs_its_own_copy_on_the_last_stage():
    gpt2 = profile_model("gpt2")
    split = estimate_memory(gpt2, 1, 2, max_length=16, batch_size=1)
    head_copy = gpt2.vocab_size * gpt2.hidden_size
    assert split.weights == pytest.approx((6 * gpt2.params_per_layer + gpt2.head_params + head_copy) * 2 / GIB)


def test_kv_cache_shards_then_replicates():
    profile = profile_model("meta-llama/Llama-3.1-8B")  # 8 KV heads
    tokens = 8 * 2048
    full = estimate_memory(profile, 1, 1).kv_cache
    assert full == pytest.approx(tokens * profile.kv_bytes_per_token("bfloat16") / GIB)
    assert estimate_memory(profile, 8, 1).kv_cache == pytest.approx(full / 8)
    assert layout_problem(profile, 16, 1) is None  # 32 heads / 16, and 8 KV heads are replicated
    assert estimate_memory(profile, 16, 1).kv_cache == pytest.approx(full / 8)
    assert estimate_memory(profile, 1, 1, batch_size=16).kv_cache == pytest.approx(2 * full)


def test_logits_cover_continuation_positions_only():
    profile = profile_model("meta-llama/Llama-3.1-8B")
    short = estimate_memory(profile, 1, 1, max_length=CONTINUATION_TOKENS)
    long = estimate_memory(profile, 1, 1, max_length=4 * CONTINUATION_TOKENS)
    logits = 8 * CONTINUATION_TOKENS * profile.vocab_size * 8 / GIB
    per_token = (short.activations - logits) / (8 * CONTINUATION_TOKENS)
    assert long.activations == pytest.approx(logits + per_token * 8 * 4 * CONTINUATION_TOKENS)


def test_overhead_and_margin():
    profile = profile_model("meta-llama/Llama-2-7b-hf")
    single, tp8, hybrid = estimate_memory(profile, 1, 1), estimate_memory(profile, 8, 1), estimate_memory(profile, 4, 2)
    assert single.overhead < tp8.overhead and hybrid.overhead > estimate_memory(profile, 4, 1).overhead
    assert estimate_memory(profile, 1, 1, on_cpu=True).overhead == pytest.approx(1.0)
    for memory in (single, tp8, hybrid):
        assert memory.margin == pytest.approx(MARGIN * (memory.weights + memory.kv_cache + memory.activations))
        assert memory.total == pytest.approx(
            memory.weights + memory.kv_cache + memory.activations + memory.overhead + memory.margin
        )


def _rate(profile, tp, pp, **overrides):
    link = {
        "dtype": "bfloat16",
        "max_length": 2048,
        "batch_size": 8,
        "tflops": 312.0,
        "memory_bandwidth_gbps": 2039.0,
        "intra_gbps": 600.0,
        "stage_link_gbps": 600.0,
    }
    return replica_tokens_per_s(profile, tp, pp, **{**link, **overrides})


def test_cost_model_trends():
    profile = profile_model("meta-llama/Llama-2-70b-hf")
    assert _rate(profile, 8, 1) > _rate(profile, 8, 1, intra_gbps=25.0)
    assert _rate(profile, 1, 4, stage_link_gbps=600.0) > _rate(profile, 1, 4, stage_link_gbps=1.0)
    # a pipeline idles while it fills: per GPU it does less than tensor parallelism over NVLink
    assert _rate(profile, 1, 8) / 8 < _rate(profile, 8, 1) / 8
    # more GPUs in a replica do more work per second
    assert _rate(profile, 8, 1) > _rate(profile, 2, 1)
    # one token at a time is bound by reading the weights, not by FLOPs
    lone = _rate(profile, 1, 1, max_length=1, batch_size=1)
    assert lone == pytest.approx(2039e9 / (profile.params * 2), rel=0.01)
