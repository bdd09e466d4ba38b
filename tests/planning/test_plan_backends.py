"""Backends declare what they can split; the planner proposes only that, and the CLI says which backend.

This environment has transformers only (vLLM lives in .venv-vllm; see tests/vllm for its side).
"""

from __future__ import annotations

import json

import pytest

from clitools import run_main
from evalfleet.planning import backends, parse_gpus, plan, profile_model


def test_transformers_refuses_falcon_180b_on_two_small_nodes_with_the_reason(capsys, monkeypatch):
    """A device_map split stays inside one node, and 4 GPUs of 80 GB cannot hold 335 GB of weights."""
    code, out, err = run_main(["plan", "--model", "tiiuae/falcon-180B", "--gpus", "2x4xH100-80GB"], capsys, monkeypatch)
    assert code != 0 and "does not fit" in out and "transformers" in out
    line = err.strip()
    assert "\n" not in line and line.startswith("error:")
    assert "no tensor-parallel plan for falcon" in line and "not Llama-style" in line
    assert "(device_map over 4 GPUs)" in line and "a device_map split stays inside one node" in line


def test_transformers_still_splits_llama(capsys, monkeypatch):
    code, out, _ = run_main(["plan", "--model", "meta-llama/Llama-2-70b-hf", "--gpus", "2x8xH100-80GB", "--json"],
                            capsys, monkeypatch)
    assert code == 0
    document = json.loads(out)
    assert document["fits"] and document["backend"]["name"] == "hf" and document["tp"] * document["pp"] > 1


def test_hybrid_layouts_need_both_declarations():
    llama, falcon = profile_model("meta-llama/Llama-2-70b-hf"), profile_model("tiiuae/falcon-40b")
    inventory = parse_gpus("8xA100-80GB")
    assert plan(llama, inventory, strategy="hybrid", backend="hf").fits
    refused = plan(falcon, inventory, strategy="pp", backend="hf")
    assert not refused.fits and "not Llama-style" in refused.reason
    assert backends.layout_problem("hf", "falcon", "FalconForCausalLM", 1, 1) is None


@pytest.mark.parametrize("command", [
    ["run", "--model", "demo", "--device", "cpu", "--backend", "vllm"],
    ["plan", "--model", "gpt2", "--gpus", "8xA100-80GB", "--backend", "vllm"],
])
def test_backend_vllm_without_vllm_names_the_install_command(command, capsys, monkeypatch):
    assert not backends.installed("vllm")
    code, out, err = run_main(command, capsys, monkeypatch)
    assert code == 2
    assert err.count("\n") == 1 and "pip install 'evalfleet[vllm]'" in err and "make vllm" in err


def test_auto_on_the_cpu_uses_transformers():
    assert backends.resolve_backend("auto", on_gpu=False) == "hf"
    assert backends.resolve_backend("auto", on_gpu=True) == "hf"  # vLLM is not installed here
