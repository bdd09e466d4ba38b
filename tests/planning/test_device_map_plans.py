"""Families transformers can neither shard (no tp plan) nor pipeline (not Llama-style) still plan:
their layers split over one node's GPUs in one process (the device_map strategy), at one GPU's speed.

This environment has transformers only, as the default install does (vLLM lives in .venv-vllm).
"""

from __future__ import annotations

import json

import pytest

from clitools import run_main
from evalfleet.planning import backends, parse_gpus, plan, profile_model
from evalfleet.planning.model_profile import _CONFIGS
from evalfleet.planning.strategy import COMPUTE_EFFICIENCY, replica_speeds

A100_NODE = "8xA100-80GB"


def falcon_180b_config(folder, with_architectures: bool):
    config = json.loads((_CONFIGS / "falcon-180b.json").read_text())
    for key in ("_name_or_path", "_aliases", *(() if with_architectures else ("architectures",))):
        config.pop(key, None)
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("with_architectures", [True, False])
def test_falcon_180b_plans_on_one_a100_node_in_the_default_install(with_architectures, tmp_path, capsys, monkeypatch):
    assert not backends.installed("vllm")
    config = falcon_180b_config(tmp_path, with_architectures)
    code, out, err = run_main(["plan", "--model", str(config), "--gpus", A100_NODE, "--json"], capsys, monkeypatch)
    assert code == 0, err
    document = json.loads(out)
    assert document["fits"] and document["backend"]["name"] == "hf"
    assert document["strategy"] == "device_map" and document["tp"] == 1 and document["dp"] == 1
    assert 2 <= document["pp"] == document["gpus_used"] <= 8 and document["nodes_used"] == 1
    assert document["per_gpu_gb"]["total"] <= 80
    weights_gb = document["model"]["weights_gb"]
    assert weights_gb > 300 and document["pp"] * document["per_gpu_gb"]["weights"] >= weights_gb
    assert "one GPU computes at a time" in document["reason"]


@pytest.mark.parametrize("model", ["facebook/opt-175b", "bigscience/bloom", "tiiuae/falcon-40b"])
def test_families_without_tp_or_pp_plan_with_a_device_map(model):
    """Where transformers can split neither way (both refusals shown), the device_map fits."""
    profile, inventory = profile_model(model), parse_gpus(A100_NODE)
    for strategy in ("tp", "pp"):
        refused = plan(profile, inventory, strategy=strategy, backend="hf")
        assert not refused.fits and ("no tensor-parallel plan" in refused.reason or "not Llama-style" in refused.reason)
    found = plan(profile, inventory, backend="hf")
    assert found.fits and found.strategy.value == "device_map", found.reason
    assert found.layout.tp == 1 and found.layout.pp >= 2 and found.per_gpu.total <= 80
    nodes = {node for node, _ in found.placement}
    assert nodes == {0} and len(found.placement) == found.layout.pp * found.layout.dp


def test_a_device_map_runs_at_one_gpus_speed_over_the_whole_model():
    """One stage computes at a time: about one GPU's compute over the whole model, less the hops,
    however many GPUs hold the layers; a pipeline over the same GPUs would be modeled far faster."""
    profile, inventory = profile_model("tiiuae/falcon-180B"), parse_gpus(A100_NODE)
    found = plan(profile, inventory, backend="hf")
    gpu = inventory.nodes[0].gpus[0].spec
    one_gpu = gpu.bf16_tflops * 1e12 * COMPUTE_EFFICIENCY / profile.flops_per_token(context=found.max_length // 2)
    assert 0.9 * one_gpu <= found.estimated_tokens_per_s <= one_gpu
    device_maps = [alt for alt in found.alternatives if alt.strategy.value == "device_map"]
    assert device_maps and all(alt.estimated_tokens_per_s <= found.estimated_tokens_per_s for alt in device_maps)
    figures = {"dtype": "bfloat16", "max_length": 2048, "batch_size": 8, "tflops": gpu.bf16_tflops,
               "memory_bandwidth_gbps": gpu.memory_bandwidth_gbps, "intra_gbps": 300.0, "stage_link_gbps": 300.0}
    pipelined = replica_speeds(profile, 1, found.layout.pp, **figures)[0]
    in_turn = replica_speeds(profile, 1, found.layout.pp, device_map=True, **figures)[0]
    assert in_turn < pipelined / 2


def test_llama_keeps_real_pipelines_unless_a_device_map_is_asked_for():
    profile, inventory = profile_model("meta-llama/Llama-2-70b-hf"), parse_gpus(A100_NODE)
    found = plan(profile, inventory, backend="hf")
    assert all(item.strategy.value != "device_map" for item in (found, *found.alternatives))
    asked = plan(profile, inventory, strategy="device_map", backend="hf")
    assert asked.fits and asked.strategy.value == "device_map" and asked.layout.pp >= 2


def test_the_table_shows_the_device_map_and_its_one_process(capsys, monkeypatch):
    code, out, _ = run_main(["plan", "--model", "tiiuae/falcon-180B", "--gpus", A100_NODE], capsys, monkeypatch)
    assert code == 0
    assert "fits: device_map tp=1" in out and "placement (replica: node:gpu of its one process)" in out
    code, out, _ = run_main(["plan", "--help"], capsys, monkeypatch)
    assert code == 0 and "device_map" in out


def test_a_ray_pool_refuses_a_device_map_job_at_submit_in_one_sentence(tmp_path):
    """Ray pools run tp, pp and dp over rank actors; a job only a device_map fits is refused when it is
    submitted, not failed when its driver starts."""
    from evalfleet.orchestrator.ray_pool import inventory_from_ray
    from evalfleet.orchestrator.demand import size_request
    from evalfleet.types import EvaluationRequest, UsageError

    falcon_180b_config(tmp_path, with_architectures=True)
    request = EvaluationRequest.model_validate({"model": {"path": str(tmp_path)}, "tasks": {"names": "demo_mc"}})
    nodes = [{"NodeID": node, "Alive": True, "Resources": {"CPU": 8.0, "GPU": 8.0, "accelerator_type:A100": 1.0}}
             for node in ("a", "b")]
    ray_pool, _ = inventory_from_ray(nodes)
    assert plan(profile_model(str(tmp_path)), ray_pool, backend="hf").strategy.value == "device_map"
    with pytest.raises(UsageError, match=r"fits this pool only as a device_map .*, which a Ray pool does not run"):
        size_request(request, ray_pool)
