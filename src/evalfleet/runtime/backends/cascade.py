"""Attention over a prefix every row shares, its keys and values held and read once.

A generation batch whose prompts share a few-shot prefix would otherwise hold that prefix's keys
and values once per row and read them all at every decode step; on a CPU a decode step is then
bound by memory reads (measured on the GSM8K-shaped benchmark: attention was 71% of a step, 5 ms
for 199 rows of 262 columns, of which 214 the shared prefix). Here the rows' cache holds only
what follows the prefix, and each layer's attention is computed in two parts that one softmax
joins: the queries of all rows against the prefix's keys at once (one matrix product, the prefix
read once), and each row against its own keys under its mask. The result equals attention over
the whole row up to float rounding (checked against whole prompts the first time, decode.py).
A prefill (several positions per row) puts the prefix beside each row's keys for one layer at a
time and calls `sdpa`, whose kernels never hold the scores: those would take rows x heads x
positions x columns.

The function is registered with transformers' attention interface and stands in for `sdpa`: with
no prefix given (`sharing` not entered) it is `sdpa` itself, so a model switched to it computes
everything else exactly as before.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "evalfleet_cascade"
_given = threading.local()  # .layers: the prefix's (keys, values) per layer, while a forward pass shares it


class CascadeUnsupported(RuntimeError):
    """The model's attention takes something the two-part form does not (soft-capping, sinks,
    a position bias, sliding windows) or does not say its layer."""


@contextmanager
def sharing(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Forward passes inside attend to `layers` (each [1, kv_heads, prefix, dim]) before their own keys."""
    _given.layers = layers
    try:
        yield
    finally:
        _given.layers = None


def cascade_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    layers = getattr(_given, "layers", None)
    if layers is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    unsupported = [name for name in ("softcap", "s_aux", "sinks", "position_bias", "sliding_window") if kwargs.get(name) is not None]
    index = getattr(module, "layer_idx", None)
    if unsupported or index is None:
        raise CascadeUnsupported(f"attention with {', '.join(unsupported) or 'no layer index'}")
    prefix_keys, prefix_values = layers[index]
    rows, heads, length, dim = query.shape
    kv_heads, own = key.shape[1], key.shape[2]
    allowed = _allowed(attention_mask, length, own, query.device)
    if length > 1:
        # a prefill: the prefix beside each row's keys for this layer only, and sdpa's own kernel
        # (its scores are never materialized: rows x heads x length x columns would be gigabytes)
        keys, values = beside(prefix_keys, key), beside(prefix_values, value)
        assert allowed is not None
        seen = torch.ones((*allowed.shape[:3], prefix_keys.shape[2]), dtype=torch.bool, device=query.device)
        full = torch.cat([seen if allowed.dtype == torch.bool else torch.zeros_like(seen, dtype=allowed.dtype), allowed], dim=-1)
        return sdpa_attention_forward(module, query, keys, values, full, dropout=dropout, scaling=scaling, is_causal=False, **kwargs)
    # a decode step: one query per row; the prefix read once for all rows
    groups = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    grouped = query.reshape(rows, kv_heads, groups, dim)  # query heads by the key head they read
    # against the prefix, every row at once: [kv_heads, rows * groups, prefix]
    flat = grouped.transpose(0, 1).reshape(kv_heads, rows * groups, dim)
    to_prefix = torch.bmm(flat, prefix_keys[0].transpose(1, 2)).view(kv_heads, rows, groups, -1).transpose(0, 1)
    # against the row's own keys, under its padding mask: [rows, kv_heads, groups, own]
    to_own = torch.matmul(grouped, key.transpose(2, 3))
    if allowed is not None:
        # [rows or 1, 1, 1, own] -> over the groups of each key head
        to_own = to_own.masked_fill(~allowed, float("-inf")) if allowed.dtype == torch.bool else to_own + allowed
    weights = torch.softmax(torch.cat([to_prefix, to_own], dim=-1).float() * scale, dim=-1).to(value.dtype)
    prefix = weights.shape[-1] - own
    from_prefix = torch.bmm(weights[..., :prefix].transpose(0, 1).reshape(kv_heads, rows * groups, prefix), prefix_values[0])
    output = from_prefix.view(kv_heads, rows, groups, dim).transpose(0, 1) + torch.matmul(weights[..., prefix:], value)
    return output.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


def beside(prefix: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """A held prefix ([1, kv_heads, prefix, dim]) repeated for each row of `own` and put before it."""
    return torch.cat([prefix.expand(own.shape[0], -1, -1, -1), own], dim=2)


def _allowed(mask: torch.Tensor | None, length: int, own: int, device: torch.device) -> torch.Tensor | None:
    """The mask over the row's own keys, [rows or 1, 1, length, own]: as given (boolean, or added
    when it is a float bias), else causal where several positions are queried at once."""
    if mask is not None:
        return mask[:, :, :, -own:]
    if length == 1:
        return None
    return torch.ones(length, own, dtype=torch.bool, device=device).tril(own - length)[None, None]


def enable(model: Any) -> bool:
    """Switch a model that attends with `sdpa` to the cascade function (which is `sdpa` until a
    prefix is shared); False where the model uses another attention or cannot switch."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, cascade_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError, AttributeError):
        return False
    return bool(model.config._attn_implementation == NAME)
