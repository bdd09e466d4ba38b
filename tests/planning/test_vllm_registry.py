"""vLLM's registry answers, kept on disk per vLLM version so `plan` need not import vLLM each time."""

from __future__ import annotations

import json
import sys

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
