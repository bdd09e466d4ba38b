"""A generation batch's shared prefix held once and read once per step (cascade.py): the rows'
texts equal whole prompts', on a Llama with grouped keys and values (4 query heads, 2 key heads)
and on a NeoX, left-padded, at several prompt lengths, with rows joining on the prefix and rows
that do not continue it."""

from __future__ import annotations

import pytest
import torch
from tinymodels import build_tiny_model

from evalfleet.runtime.backends import cascade, decode
from evalfleet.runtime.backends.base import GenerationItem
from evalfleet.runtime.backends.hf import HFBackend

SHOTS = "Q: 12 + 7 = ?\nA: 19\n\nQ: 3 + 4 = ?\nA: 7\n\nQ: 40 + 2 = ?\nA: 42\n\nQ: 8 + 8 = ?\nA: 16\n\n"


@pytest.fixture(scope="module", params=["llama", "gpt_neox"])
def backend(request, tmp_path_factory) -> HFBackend:
    folder = build_tiny_model(tmp_path_factory.mktemp("cascade") / request.param, family=request.param, max_positions=256)
    loaded = HFBackend.load(str(folder), device="cpu", dtype="float32", share_prefixes=True)
    assert loaded.cascade and loaded.model.config._attn_implementation == cascade.NAME
    return loaded


def _items(backend: HFBackend, questions: range, shots: str = SHOTS) -> list[GenerationItem]:
    """Few-shot prompts of several lengths (left padding differs row to row), limits of 1 to 30 tokens."""
    encode = backend.tokenizer.encode
    return [
        GenerationItem(tuple(encode(shots + f"Q: {n} + {n * 7 % 90} = ?" + " x" * (n % 6) + "\nA:")), ("\n\n", "@@"), 1 + n * 7 % 30)
        for n in questions
    ]


def _decoded(backend: HFBackend, items: list[GenerationItem], rows: int) -> list[str]:
    got: dict[int, str] = {}
    backend.decoder(rows, 10**6).run(items, got.__setitem__)
    return [got[k] for k in range(len(items))]


def _counting(monkeypatch) -> list[int]:
    """How many rows each forward pass with a shared prefix held (the prefix passes really ran)."""
    passes: list[int] = []
    real = cascade.sharing

    def counted(layers):
        passes.append(layers[0][0].shape[0])
        return real(layers)

    monkeypatch.setattr(cascade, "sharing", counted)
    return passes


def test_attention_over_a_held_prefix_equals_attention_over_whole_rows(backend):
    """One layer's output: queries of left-padded rows (several at once, then one at a time) against
    a prefix held once plus each row's own keys, and against the whole rows."""
    torch.manual_seed(0)
    module = backend.model.model.layers[1].self_attn if hasattr(backend.model, "model") else backend.model.gpt_neox.layers[1].attention
    heads, kv_heads, dim, prefix, own = 4, 2, 12, 9, 7
    if backend.model.config.model_type == "gpt_neox":
        kv_heads = heads
    query = torch.randn(3, heads, own, dim)
    keys, values = torch.randn(1, kv_heads, prefix + own, dim).expand(3, -1, -1, -1).clone(), torch.randn(3, kv_heads, prefix + own, dim)
    values[:, :, :prefix] = values[:1, :, :prefix]
    keys[:, :, prefix:] += torch.randn(3, kv_heads, own, dim)  # rows differ after the prefix
    allowed = torch.ones(3, 1, own, prefix + own, dtype=torch.bool).tril(prefix)
    allowed[1, :, :, prefix : prefix + 2] = False  # row 1 is left-padded by 2 after the prefix
    allowed[2, :, :, prefix : prefix + 5] = False
    allowed[1, :, :2] = allowed[2, :, :5] = True  # padding queries see something (their output is unused)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=allowed, scale=0.3, enable_gqa=kv_heads != heads
    ).transpose(1, 2)
    with cascade.sharing([(keys[:1, :, :prefix], values[:1, :, :prefix])] * 2):
        got, _ = cascade.cascade_attention(module, query, keys[:, :, prefix:], values[:, :, prefix:], allowed[..., prefix:], scaling=0.3)
    real = allowed.any(-1).squeeze(1)  # queries that are not padding
    assert torch.allclose(got[real], expected[real], atol=1e-5)
    with cascade.sharing([(keys[:1, :, :prefix], values[:1, :, :prefix])] * 2):  # decode: one query, no mask
        step, _ = cascade.cascade_attention(module, query[:, :, -1:], keys[:, :, prefix:], values[:, :, prefix:], None, scaling=0.3)
    whole = torch.nn.functional.scaled_dot_product_attention(
        query[:, :, -1:], keys, values, scale=0.3, enable_gqa=kv_heads != heads
    ).transpose(1, 2)
    assert torch.allclose(step, whole, atol=1e-5)
    with cascade.sharing([(keys[:1, :, :prefix], values[:1, :, :prefix])] * 2):  # decode under the padding mask
        step, _ = cascade.cascade_attention(module, query[:, :, -1:], keys[:, :, prefix:], values[:, :, prefix:], allowed[:, :, -1:, prefix:], scaling=0.3)
    whole = torch.nn.functional.scaled_dot_product_attention(
        query[:, :, -1:], keys, values, attn_mask=allowed[:, :, -1:], scale=0.3, enable_gqa=kv_heads != heads
    ).transpose(1, 2)
    assert torch.allclose(step, whole, atol=1e-5)
    # three new queries after four cached keys of the row's own, no mask given: causal among them
    with cascade.sharing([(keys[:1, :, :prefix], values[:1, :, :prefix])] * 2):
        later, _ = cascade.cascade_attention(module, query[:, :, -3:], keys[:, :, prefix:], values[:, :, prefix:], None, scaling=0.3)
    causal = torch.ones(3, prefix + own, dtype=torch.bool).tril(prefix + own - 3)
    whole = torch.nn.functional.scaled_dot_product_attention(
        query[:, :, -3:], keys, values, attn_mask=causal, scale=0.3, enable_gqa=kv_heads != heads
    ).transpose(1, 2)
    assert torch.allclose(later, whole, atol=1e-5)


def test_rows_on_a_held_prefix_generate_what_whole_prompts_do(backend, monkeypatch):
    """24 rows, 5 at a time (newcomers join on the held prefix as rows leave), then all at once."""
    items = _items(backend, range(24))
    whole = backend.generate_static(items)
    passes = _counting(monkeypatch)
    assert _decoded(backend, items, 5) == whole
    assert passes and max(passes) <= 5 and len(passes) > 24  # prefills and decode steps on the prefix
    assert _decoded(backend, items, 64) == whole


def test_a_newcomer_that_does_not_continue_the_prefix_takes_the_rows_off_it(backend, monkeypatch):
    """Rows on one prefix, then rows on another and rows with none: the running rows take the
    prefix into their own cache, and every text is still the whole prompt's."""
    items = _items(backend, range(6)) + _items(backend, range(6, 10), shots=SHOTS.replace("12", "51")) + _items(backend, range(10, 13), shots="")
    whole = backend.generate_static(items)
    unshared: list[int] = []
    real = decode.ContinuousDecoder._unshare
    monkeypatch.setattr(decode.ContinuousDecoder, "_unshare", lambda self: unshared.append(len(self.active)) or real(self))
    assert _decoded(backend, items, 6) == whole  # the first six rows are the first prefix's
    assert unshared, "no running batch met a newcomer off its prefix"


def test_attention_the_held_prefix_cannot_serve_falls_back_to_rows_holding_it(backend, monkeypatch):
    """An attention call with soft-capping (as Gemma 2 passes): the prefix is held per row from then
    on, with the same texts."""
    from transformers import AttentionInterface

    def with_softcap(*args, **kwargs):
        if getattr(cascade._given, "layers", None) is not None:
            kwargs["softcap"] = 30.0
        return cascade.cascade_attention(*args, **kwargs)

    items = _items(backend, range(8))
    whole = backend.generate_static(items)
    monkeypatch.setattr(backend, "cascade", True)
    monkeypatch.setitem(AttentionInterface._global_mapping, cascade.NAME, with_softcap)
    assert _decoded(backend, items, 8) == whole
    assert backend.cascade is False


def test_a_prefix_attended_without_the_rows_mask_is_caught(backend, monkeypatch):
    """A planted fault: the rows' own padding mask dropped (causal order kept), so a row sees the
    padding left of its tokens; the texts change."""
    items = _items(backend, range(12))
    whole = backend.generate_static(items)
    monkeypatch.setattr(backend, "generation_prefix_checked", True)  # the first-time check would turn sharing off
    real = cascade._allowed
    monkeypatch.setattr(cascade, "_allowed", lambda mask, length, own, device: real(None, length, own, device))
    assert _decoded(backend, items, 12) != whole
