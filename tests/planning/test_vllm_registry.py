"""vLLM's registry answers, kept on disk per vLLM version so `plan` need not import vLLM each time."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from evalfleet.planning import backends
from evalfleet.planning.backends import VllmRegistry


def test_kept_answers_come_from_the_file_without_importing_vllm(tmp_path, monkeypatch):
    path = tmp_path / "vllm-registry.json"
    path.write_text(json.dumps({"0.32.0": {"architectures": ["LlamaForCausalLM"], "supports_pp": {"LlamaForCausalLM": True}},
                                "0.31.0": {"architectures": []}}))
    monkeypatch.setitem(sys.modules, "vllm", None)  # any import of vllm would now fail
    registry = VllmRegistry(path, "0.32.0")
    assert registry.architectures() == frozenset({"LlamaForCausalLM"})
    assert registry.supports_pp("LlamaForCausalLM") is True
    assert VllmRegistry(path, "0.31.0").architectures() == frozenset()


def test_new_answers_are_kept_beside_other_versions(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "vllm-registry.json"
    fake = type(sys)("vllm")
    model = type("Model", (), {"inspect_model_cls": lambda self: type("Info", (), {"supports_pp": False})()})()
    fake.ModelRegistry = type("Registry", (), {"get_supported_archs": staticmethod(lambda: ["B", "A"]),
                                                "models": {"A": model}})
    monkeypatch.setitem(sys.modules, "vllm", fake)  # stands in for vLLM, which only its own venv has
    registry = VllmRegistry(path, "9.9")
    assert registry.architectures() == frozenset({"A", "B"}) and registry.supports_pp("A") is False
    assert json.loads(path.read_text()) == {"9.9": {"architectures": ["A", "B"], "supports_pp": {"A": False}}}
    monkeypatch.setitem(sys.modules, "vllm", None)
    again = VllmRegistry(path, "9.9")
    assert again.architectures() == frozenset({"A", "B"}) and again.supports_pp("A") is False


def test_an_unreadable_file_is_asked_again(tmp_path, monkeypatch):
    path = tmp_path / "vllm-registry.json"
    path.write_text("{not json")
    fake = type(sys)("vllm")
    fake.ModelRegistry = type("Registry", (), {"get_supported_archs": staticmethod(lambda: ["A"])})
    monkeypatch.setitem(sys.modules, "vllm", fake)
    assert VllmRegistry(path, "1").architectures() == frozenset({"A"})
    assert json.loads(path.read_text()) == {"1": {"architectures": ["A"]}}


def test_cpu_head_sizes_are_kept_and_refuse_a_model_before_loading(tmp_path, monkeypatch):
    path = tmp_path / "vllm-registry.json"
    fake = type(sys)("vllm.v1.attention.backends.cpu_attn")
    fake.CPUAttentionBackend = type("B", (), {"get_supported_head_sizes": classmethod(lambda cls: [64, 32, 128])})
    monkeypatch.setitem(sys.modules, "vllm.v1.attention.backends.cpu_attn", fake)
    registry = VllmRegistry(path, "9.9")
    assert registry.cpu_head_sizes() == [32, 64, 128]
    monkeypatch.setitem(sys.modules, "vllm.v1.attention.backends.cpu_attn", None)
    monkeypatch.setattr(backends, "_vllm_registry", lambda: VllmRegistry(path, "9.9"))  # from the file now
    assert backends.device_problem("vllm", 12, on_cpu=True) == (
        "vLLM's CPU attention has no kernel for this model's head size 12 (it has 32, 64, 128); use --backend hf")
    assert backends.device_problem("vllm", 32, on_cpu=True) is None
    assert backends.device_problem("vllm", 12, on_cpu=False) is None  # GPU kernels are another matter
    assert backends.device_problem("hf", 12, on_cpu=True) is None


@pytest.mark.parametrize("head_size", [12, 24])
def test_plan_on_the_cpu_refuses_vllm_for_a_head_size_without_a_kernel(head_size, tmp_path, monkeypatch):
    from evalfleet.planning import Inventory, plan, profile_model

    path = tmp_path / "vllm-registry.json"
    path.write_text(json.dumps({"9.9": {"cpu_head_sizes": [32, 64]}}))
    monkeypatch.setattr(backends, "_vllm_registry", lambda: VllmRegistry(path, "9.9"))
    monkeypatch.setattr(backends, "installed", lambda name: True)  # as in the vLLM environment
    model = tmp_path / "model"
    model.mkdir()
    model.joinpath("config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4 * head_size,
        "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 400,
        "max_position_embeddings": 128}))
    answer = plan(profile_model(str(model)), Inventory.from_spec("cpu"), backend="vllm")
    assert not answer.fits and f"no kernel for this model's head size {head_size}" in answer.reason


def _plan_without_architectures(config: dict, tmp_path, monkeypatch, gpus: str):
    """vLLM's planner answer for `config` with its `architectures` removed, from registry answers kept on disk."""
    from evalfleet.planning import Inventory, plan, profile_model

    path = tmp_path / "vllm-registry.json"
    path.write_text(json.dumps({"9.9": {"architectures": ["FalconForCausalLM", "LlamaForCausalLM"],
                                        "supports_pp": {"FalconForCausalLM": True}}}))
    monkeypatch.setattr(backends, "_vllm_registry", lambda: VllmRegistry(path, "9.9"))
    monkeypatch.setattr(backends, "installed", lambda name: True)  # as in the vLLM environment
    model = tmp_path / "model"
    model.mkdir()
    model.joinpath("config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "architectures"}))
    profile = profile_model(str(model))
    return profile, plan(profile, Inventory.from_spec(gpus), backend="vllm")


def test_a_config_without_architectures_is_known_by_its_model_type(tmp_path, monkeypatch):
    """An older export or a hand-written config: the architecture is the causal LM class transformers'
    auto classes map its model_type to, so vLLM's registry knows falcon."""
    falcon = json.loads((Path(backends.__file__).parent / "configs" / "falcon-180b.json").read_text())
    profile, answer = _plan_without_architectures(falcon, tmp_path, monkeypatch, "8xA100-80GB")
    assert profile.architecture == "FalconForCausalLM"
    assert answer.fits and answer.backend == "vllm", answer.reason


def test_an_unknown_model_type_without_architectures_is_refused_in_one_sentence(tmp_path, monkeypatch):
    config = {"model_type": "made_up_lm", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
              "intermediate_size": 128, "vocab_size": 400, "max_position_embeddings": 128}
    profile, answer = _plan_without_architectures(config, tmp_path, monkeypatch, "1xA100-80GB")
    assert profile.architecture == "made_up_lm"
    assert not answer.fits and answer.reason == "vLLM 9.9 has no implementation of made_up_lm"
