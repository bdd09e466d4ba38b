"""Closed-form parameter counts of the decoder-only families, from config.json alone.

Each formula mirrors the module tree transformers builds for that `model_type`, so the count
equals a meta-device build exactly (tests check this on random configs). Counting by formula
keeps planning free of torch: a 405B profile costs microseconds instead of seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shape:
    """The architecture numbers the planner needs, read from any family's spelling of them."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int | None
    tie_word_embeddings: bool
    num_experts: int = 1
    experts_per_token: int = 1


@dataclass(frozen=True)
class Counts:
    """Parameters by where they live: lookup tables, one decoder layer, and the output end."""

    embedding: int
    per_layer: int
    head: int
    expert_per_layer: int = 0

    def total(self, num_layers: int) -> int:
        return self.embedding + self.per_layer * num_layers + self.head


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _norm(size: int, bias: bool = True, affine: bool = True) -> int:
    if not affine:
        return 0
    return size * (2 if bias else 1)


def _output(shape: Shape, final_norm: int, width: int | None = None) -> int:
    """The final norm, plus the lm_head matrix when it is not the (tied) input embedding."""
    untied = 0 if shape.tie_word_embeddings else shape.vocab_size * (width or shape.hidden_size)
    return final_norm + untied


def llama_like(shape: Shape, cfg: dict[str, Any]) -> Counts:
    """Llama, Mistral, Qwen2 and Mixtral: RMSNorm, GQA attention, gated MLP or gated experts."""
    h, q, kv = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    qkv_bias = cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False))
    o_bias = bool(cfg.get("attention_bias", False))
    attention = _linear(h, q, qkv_bias) + 2 * _linear(h, kv, qkv_bias) + _linear(q, h, o_bias)
    expert = 3 * h * shape.intermediate_size
    if shape.num_experts > 1:
        mlp = shape.num_experts * expert + shape.num_experts * h
        expert_params = shape.num_experts * expert
    else:
        mlp_bias = bool(cfg.get("mlp_bias", False))
        mlp = 2 * _linear(h, shape.intermediate_size, mlp_bias) + _linear(shape.intermediate_size, h, mlp_bias)
        expert_params = 0
    per_layer = attention + mlp + 2 * _norm(h, bias=False)
    return Counts(shape.vocab_size * h, per_layer, _output(shape, _norm(h, bias=False)), expert_params)


def falcon(shape: Shape, cfg: dict[str, Any]) -> Counts:
    h, bias = shape.hidden_size, bool(cfg.get("bias", False))
    if cfg.get("new_decoder_architecture"):
        qkv = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
    elif cfg.get("multi_query", True):
        qkv = h + 2 * shape.head_dim
    else:
        qkv = 3 * h
    if (
        not cfg.get("parallel_attn", True)
        or cfg.get("new_decoder_architecture")
        and cfg.get("num_ln_in_parallel_attn") in (None, 2)
    ):
        norms = 2
    else:
        norms = 1
    per_layer = (
        _linear(h, qkv, bias)
        + _linear(h, h, bias)
        + _linear(h, shape.intermediate_size, bias)
        + _linear(shape.intermediate_size, h, bias)
        + norms * _norm(h)
    )
    return Counts(shape.vocab_size * h, per_layer, _output(shape, _norm(h)))


def gpt_neox(shape: Shape, cfg: dict[str, Any]) -> Counts:
    h, i, bias = shape.hidden_size, shape.intermediate_size, bool(cfg.get("attention_bias", True))
    per_layer = 2 * _norm(h) + _linear(h, 3 * h, bias) + _linear(h, h, bias) + _linear(h, i, True) + _linear(i, h, True)
    return Counts(shape.vocab_size * h, per_layer, _output(shape, _norm(h)))


def opt(shape: Shape, cfg: dict[str, Any]) -> Counts:
    h, f = shape.hidden_size, shape.intermediate_size
    bias, affine = bool(cfg.get("enable_bias", True)), bool(cfg.get("layer_norm_elementwise_affine", True))
    width = int(cfg.get("word_embed_proj_dim") or h)
    projections = 2 * h * width if width != h else 0
    embedding = shape.vocab_size * width + ((shape.max_positions or 2048) + 2) * h
    per_layer = 4 * _linear(h, h, bias) + _linear(h, f, bias) + _linear(f, h, bias) + 2 * _norm(h, affine=affine)
    final = (
        _norm(h, affine=affine)
        if cfg.get("do_layer_norm_before", True) and not cfg.get("_remove_final_layer_norm")
        else 0
    )
    return Counts(embedding, per_layer, _output(shape, final, width) + projections)


def bloom(shape: Shape, cfg: dict[str, Any]) -> Counts:
    h = shape.hidden_size
    per_layer = (
        2 * _norm(h) + _linear(h, 3 * h, True) + _linear(h, h, True) + _linear(h, 4 * h, True) + _linear(4 * h, h, True)
    )
    return Counts(shape.vocab_size * h + _norm(h), per_layer, _output(shape, _norm(h)))


def gpt2(shape: Shape, cfg: dict[str, Any]) -> Counts:
    h, i = shape.hidden_size, shape.intermediate_size
    per_layer = 2 * _norm(h) + _linear(h, 3 * h, True) + _linear(h, h, True) + _linear(h, i, True) + _linear(i, h, True)
    embedding = shape.vocab_size * h + (shape.max_positions or 1024) * h
    return Counts(embedding, per_layer, _output(shape, _norm(h)))


FORMULAS: dict[str, Callable[[Shape, dict[str, Any]], Counts]] = {
    "llama": llama_like,
    "mistral": llama_like,
    "qwen2": llama_like,
    "mixtral": llama_like,
    "falcon": falcon,
    "gpt_neox": gpt_neox,
    "opt": opt,
    "bloom": bloom,
    "gpt2": gpt2,
}

# Defaults the families' config classes apply when config.json leaves a field out.
TIED_BY_DEFAULT = {"falcon", "opt", "bloom", "gpt2"}

_KEYS = {
    "hidden_size": ("hidden_size", "n_embd", "n_embed", "d_model", "dim"),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "num_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "vocab_size": ("vocab_size", "padded_vocab_size"),
}
_OPTIONAL = {
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv", "n_kv_heads", "multi_query_group_num"),
    "intermediate_size": ("intermediate_size", "ffn_dim", "ffn_hidden_size", "n_inner", "ffn_hidden"),
    "max_positions": ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"),
}


def _first(cfg: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return None


def read_shape(cfg: dict[str, Any]) -> Shape | str:
    """The normalised shape, or the name of the first required field the config lacks."""
    found = {name: _first(cfg, keys) for name, keys in _KEYS.items()}
    for name, value in found.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            return _KEYS[name][0]
    family = cfg.get("model_type", "")
    hidden, heads = found["hidden_size"], found["num_heads"]
    optional = {name: _first(cfg, keys) for name, keys in _OPTIONAL.items()}
    kv_heads = optional["num_kv_heads"] or heads
    if family == "falcon" and not cfg.get("new_decoder_architecture"):
        kv_heads = 1 if cfg.get("multi_query", True) else heads
    intermediate = optional["intermediate_size"] or 4 * hidden
    tie = cfg.get("tie_word_embeddings")
    if tie is None:
        tie = family in TIED_BY_DEFAULT
    return Shape(
        hidden_size=hidden,
        num_layers=found["num_layers"],
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate_size=int(intermediate),
        vocab_size=found["vocab_size"],
        max_positions=optional["max_positions"],
        tie_word_embeddings=bool(tie),
        num_experts=int(cfg.get("num_local_experts") or cfg.get("num_experts") or 1),
        experts_per_token=int(cfg.get("num_experts_per_tok") or 1),
    )
