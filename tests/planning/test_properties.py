"""Properties every plan must have, over random models, pools, busy GPUs and limits."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evalfleet.planning import GPU, GPU_SPECS, Inventory, Node, estimate_memory, plan, profile_model
from evalfleet.planning.memory import stage_layers

GPU_NAMES = ["A10G", "L4", "L40S", "A100-40GB", "A100-80GB", "H100", "H200", "B200"]


@st.composite
def configs(draw):
    heads = draw(st.sampled_from([8, 12, 16, 32, 40, 64, 96, 128]))
    head_dim = draw(st.sampled_from([64, 128]))
    kv = draw(st.sampled_from([d for d in (1, 2, 4, 8, heads) if heads % d == 0]))
    family = draw(st.sampled_from(["llama", "qwen2", "mistral", "gpt_neox"]))
    return {
        "model_type": family,
        "hidden_size": heads * head_dim,
        "num_hidden_layers": draw(st.integers(1, 120)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": heads * head_dim * draw(st.integers(2, 4)),
        "vocab_size": draw(st.integers(1000, 160_000)),
        "max_position_embeddings": 4096,
    }


@st.composite
def inventories(draw):
    nodes = []
    for _ in range(draw(st.integers(1, 4))):
        spec = GPU_SPECS[draw(st.sampled_from(GPU_NAMES))]
        count = draw(st.integers(1, 8))
        free = [draw(st.floats(0, spec.memory_gb)) for _ in range(count)]
        gpus = [GPU(spec.name, spec.memory_gb, f, spec.compute_capability, spec) for f in free]
        link = spec.nvlink_gbps or 25.0
        nodes.append(
            Node(gpus, "nvlink" if spec.nvlink_gbps else "pcie", link, draw(st.sampled_from([12.5, 25.0, 50.0])))
        )
    return Inventory(nodes)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cfg=configs(),
    inventory=inventories(),
    data=st.data(),
    dtype=st.sampled_from(["float32", "bfloat16", "int8", "int4"]),
    max_length=st.sampled_from([256, 1024, 2048, 4096]),
    batch_size=st.integers(1, 32),
    strategy=st.sampled_from(["auto", "auto", "single", "tp", "pp", "hybrid", "dp", "device_map"]),
)
def test_any_returned_plan_is_valid(cfg, inventory, data, dtype, max_length, batch_size, strategy):
    profile = profile_model(cfg)
    devices = [(n, g) for n, node in enumerate(inventory.nodes) for g in range(len(node.gpus))]
    busy = set(data.draw(st.lists(st.sampled_from(devices), max_size=len(devices))))
    max_gpus = data.draw(st.one_of(st.none(), st.integers(1, len(devices))))
    result = plan(
        profile,
        inventory,
        dtype=dtype,
        max_length=max_length,
        batch_size=batch_size,
        strategy=strategy,
        busy=busy,
        max_gpus=max_gpus,
    )
    layout = result.layout
    assert result.reason and "\n" not in result.reason
    if not result.fits:
        assert result.placement == [] and result.gpus_used == 0
        return
    # memory: the per-GPU need is the memory model's, and every placed GPU has that much free
    assert result.per_gpu == estimate_memory(
        profile, layout.tp, layout.pp, dtype=dtype, max_length=max_length, batch_size=batch_size
    )
    assert all(inventory.nodes[n].gpus[g].free_gb >= result.per_gpu.total for n, g in result.placement)
    # divisibility and layer count
    assert profile.num_heads % layout.tp == 0
    assert profile.num_kv_heads % layout.tp == 0 or layout.tp % profile.num_kv_heads == 0
    assert layout.pp <= profile.num_layers
    # GPUs: one rank per GPU, none busy, no more than exist or are allowed
    assert len(result.placement) == layout.total_gpus == result.gpus_used
    assert len(set(result.placement)) == len(result.placement)
    assert not set(result.placement) & busy
    assert result.gpus_used <= len(devices) - len(busy)
    if max_gpus is not None:
        assert result.gpus_used <= max_gpus
    # node boundaries: each tensor-parallel group, and each device_map replica (one process), sits in one node
    group = layout.world_size if layout.device_map else layout.tp
    for start in range(0, len(result.placement), group):
        assert len({n for n, _ in result.placement[start : start + group]}) == 1
    assert result.nodes_used == len({n for n, _ in result.placement})
    assert result.estimated_tokens_per_s > 0
    if strategy != "auto":
        assert result.strategy.value == strategy or (strategy == "single" and layout.total_gpus == 1)


@given(layers=st.integers(1, 200), pp=st.integers(1, 64))
def test_stages_split_layers_evenly(layers, pp):
    if pp > layers:
        return
    counts = stage_layers(layers, pp)
    assert sum(counts) == layers and len(counts) == pp
    assert max(counts) - min(counts) <= 1
    assert counts[-1] == min(counts)
