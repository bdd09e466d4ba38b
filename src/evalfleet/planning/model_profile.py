"""What the planner knows about a model: its size and shape, read from config.json alone.

Sources, in order: a config dict; a local folder or config.json file; a config shipped in
`planning/configs/` (well-known public models, so planning works offline); the Hugging Face
hub. Parameter counts come from the family's closed form (`families.py`) when there is one,
else from building the model on torch's meta device, which allocates nothing. Profiles are
cached, so a scheduler planning thousands of layouts pays for each model once.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from evalfleet.planning.families import FORMULAS, Counts, Shape, read_shape
from evalfleet.types import UsageError, resolve_model_path

GIB = 2**30
DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "int4": 0.5}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_CONFIGS = Path(__file__).parent / "configs"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class PlanningError(UsageError):
    """A model id, config or hardware spec the planner cannot use; the message is one sentence."""


def normalize_dtype(dtype: str, default: str = "bfloat16") -> str:
    """One of DTYPE_BYTES' keys; "auto" means `default` (the checkpoint's own dtype)."""
    name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name == "auto":
        return default
    if name not in DTYPE_BYTES:
        raise PlanningError(f"unknown dtype '{dtype}'; use one of auto, {', '.join(DTYPE_BYTES)}")
    return name


@dataclass(frozen=True)
class ModelProfile:
    """A model's size and shape. Counts are parameters; bytes follow from a dtype."""

    name: str
    family: str
    architecture: str
    params: int
    params_per_layer: int
    embedding_params: int
    head_params: int
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None
    intermediate_size: int
    tie_word_embeddings: bool
    num_experts: int = 1
    experts_per_token: int = 1
    expert_params_per_layer: int = 0
    default_dtype: str = "bfloat16"
    count_method: str = "analytic"

    def bytes_per_param(self, dtype: str) -> float:
        return DTYPE_BYTES[normalize_dtype(dtype, self.default_dtype)]

    def weight_bytes(self, dtype: str) -> int:
        return int(self.params * self.bytes_per_param(dtype))

    def weight_bytes_by_dtype(self) -> dict[str, int]:
        return {dtype: self.weight_bytes(dtype) for dtype in DTYPE_BYTES}

    def kv_bytes_per_token(self, dtype: str) -> int:
        """Keys and values of one token over all layers. Quantized weights keep a 16-bit cache."""
        element = max(self.bytes_per_param(dtype), 2.0)
        return int(2 * self.num_layers * self.num_kv_heads * self.head_dim * element)

    @property
    def active_params(self) -> int:
        """Parameters one token multiplies through: no lookup tables, only its routed experts."""
        idle_experts = self.num_experts - self.experts_per_token
        idle = self.num_layers * self.expert_params_per_layer * idle_experts // max(self.num_experts, 1)
        lm_head = self.vocab_size * self.hidden_size if self.tie_word_embeddings else 0
        return self.params - self.embedding_params - idle + lm_head

    def flops_per_token(self, context: int = 0) -> float:
        """Forward FLOPs for one token that attends to `context` earlier positions."""
        attention = 4 * self.num_layers * self.num_heads * self.head_dim * context
        return 2.0 * self.active_params + attention

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "weight_bytes": self.weight_bytes_by_dtype()}


def estimate_weights_gb(profile: ModelProfile | dict[str, Any] | str | os.PathLike, dtype: str = "bfloat16") -> float:
    """Weights alone, in GiB (the unit nvidia-smi and vLLM print as GB); what the router compares."""
    if not isinstance(profile, ModelProfile):
        profile = profile_model(profile)
    return profile.weight_bytes(dtype) / GIB


def shipped_models() -> dict[str, Path]:
    """Known public model ids, each with its bundled config.json."""
    return dict(_shipped_index())


@lru_cache(maxsize=1)
def _shipped_index() -> dict[str, Path]:
    index = {}
    for path in sorted(_CONFIGS.glob("*.json")):
        cfg = json.loads(path.read_text())
        for model_id in [cfg["_name_or_path"], *cfg.get("_aliases", [])]:
            index[model_id] = path
    return index


def _find_shipped(name: str) -> Path | None:
    wanted = name.strip().lower()
    for model_id, path in _shipped_index().items():
        if wanted in (model_id.lower(), model_id.split("/")[-1].lower()):
            return path
    return None


def profile_model(source: str | os.PathLike | dict[str, Any], *, exact: bool = False) -> ModelProfile:
    """Profile a model from a config dict, a local path, a shipped id or a hub id (cached).

    `exact=True` counts parameters by a meta-device build even where a formula exists.
    """
    if isinstance(source, dict):
        return _profile_from_text(json.dumps(source, sort_keys=True), str(source.get("_name_or_path", "config")), exact)
    source = os.fspath(source)
    path = Path(source).expanduser()
    try:
        stamp = (path / "config.json" if path.is_dir() else path).stat().st_mtime_ns  # edited configs are read again
    except OSError:
        stamp = 0
    return _profile_from_source(source, exact, stamp)


@lru_cache(maxsize=256)
def _profile_from_source(source: str, exact: bool, stamp: int) -> ModelProfile:
    return _profile_from_text(_read_config_text(source), source, exact)


@lru_cache(maxsize=256)
def _profile_from_text(text: str, name: str, exact: bool) -> ModelProfile:
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as error:
        raise PlanningError(f"the config of '{name}' is not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(cfg, dict):
        raise PlanningError(f"the config of '{name}' is not a JSON object")
    return _build_profile(cfg, name, exact)


def _read_config_text(source: str) -> str:
    path = Path(resolve_model_path(source))
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise PlanningError(f"the folder '{source}' has no config.json")
        return path.read_text()
    if path.is_file():
        return path.read_text()
    shipped = _find_shipped(source)
    if shipped is not None:
        return shipped.read_text()
    if source.startswith((".", "/", "~")) or source.endswith(".json") or not _HUB_ID.match(source):
        raise PlanningError(f"no such model folder or config file: '{source}'")
    return _fetch_from_hub(source)


def _hub_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(flag.strip().lower() in ("1", "true", "yes", "on") for flag in flags)


def _hub_reachable(timeout: float = 2.0) -> bool:
    """A quick TCP probe, so that an offline machine fails in seconds, not after the hub client's retries."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _fetch_from_hub(model_id: str) -> str:
    unknown = f"unknown model '{model_id}': not a local path nor a shipped config such as meta-llama/Llama-2-70b-hf"
    if _hub_offline():
        raise PlanningError(f"{unknown}, and the hub is off (HF_HUB_OFFLINE)")
    if not _hub_reachable():
        raise PlanningError(f"{unknown}, and the Hugging Face hub cannot be reached")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(model_id, "config.json", etag_timeout=5)).read_text()
    except Exception as error:  # the hub client raises many unrelated types; all mean "no config"
        raise PlanningError(
            f"{unknown}, and the hub did not provide its config.json ({type(error).__name__})"
        ) from None


def _build_profile(cfg: dict[str, Any], name: str, exact: bool) -> ModelProfile:
    shape = read_shape(cfg)
    if isinstance(shape, str):
        raise PlanningError(f"the config of '{name}' lacks the field '{shape}' (or it is not a positive integer)")
    if shape.hidden_size % shape.num_heads and "head_dim" not in cfg:
        raise PlanningError(
            f"the config of '{name}' has {shape.num_heads} heads, which do not divide hidden_size {shape.hidden_size}"
        )
    family = str(cfg.get("model_type", "unknown"))
    formula = FORMULAS.get(family)
    if formula is not None and not exact:
        counts, method = formula(shape, cfg), "analytic"
    else:
        counts, method = _meta_counts(cfg, shape, name)
    return ModelProfile(
        name=name,
        family=family,
        architecture=architecture_of(cfg, family),
        params=counts.total(shape.num_layers),
        params_per_layer=counts.per_layer,
        embedding_params=counts.embedding,
        head_params=counts.head,
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        vocab_size=shape.vocab_size,
        max_positions=shape.max_positions,
        intermediate_size=shape.intermediate_size,
        tie_word_embeddings=shape.tie_word_embeddings,
        num_experts=shape.num_experts,
        experts_per_token=shape.experts_per_token,
        expert_params_per_layer=counts.expert_per_layer,
        default_dtype=_config_dtype(cfg),
        count_method=method,
    )


def architecture_of(cfg: dict[str, Any], family: str) -> str:
    """The model class a config names (`architectures`), else the causal LM class transformers' auto
    classes map its `model_type` to, as `AutoModelForCausalLM` would load a config without one (a
    hand-written config, an older export), else the `model_type` (`family`) itself."""
    if cfg.get("architectures"):
        return str(cfg["architectures"][0])
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # imports torch: only here

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(family, family)


def _config_dtype(cfg: dict[str, Any]) -> str:
    declared = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    return (
        _DTYPE_ALIASES.get(declared, declared) if declared in DTYPE_BYTES or declared in _DTYPE_ALIASES else "bfloat16"
    )


def _meta_counts(cfg: dict[str, Any], shape: Shape, name: str) -> tuple[Counts, str]:
    """Count by building the model on the meta device; an unknown architecture falls back to Llama's shape."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if not k.startswith("_")})
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # transformers does not know this architecture: estimate it
        counts = FORMULAS["llama"](shape, {})
        return counts, "estimate"
    total = sum(p.numel() for p in model.parameters())
    layers = next(
        (m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == shape.num_layers),
        None,
    )
    per_layer = sum(p.numel() for p in layers[0].parameters()) if layers is not None else 0
    embedding = model.get_input_embeddings().weight.numel()
    head = total - embedding - per_layer * shape.num_layers
    return Counts(embedding, per_layer, head), "meta"
