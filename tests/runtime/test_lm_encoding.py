"""EvalfleetLM encodes request strings in batches; the tokens must be exactly lm-eval's, string by string."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lm_eval.api.model import TemplateLM

from evalfleet.runtime.lm import EvalfleetLM

PAIRS = [
    ("Question: 2 + 2 =", " 4"),
    ("Question: 2 + 2 =", " 5"),  # the same context again, as in multiple choice
    ("Answer with a trailing space: ", "yes"),  # the space moves to the continuation
    ("Two spaces  ", "no"),
    ("", "an empty context"),  # the prefix token becomes the context
    ("<s> starts with the BOS text", " and goes on"),
    ("<s>", " only BOS"),
    ("ünïcödé and 数字 ", "✓"),
]


def _requests(pairs):
    return [SimpleNamespace(args=pair) for pair in pairs]


def _lm(tokenizer, add_bos_token=None):
    runner = SimpleNamespace(max_length=24, samples=False, shares_prefixes=False, reuses_prefixes=False)
    return EvalfleetLM(runner, tokenizer, "test", add_bos_token=add_bos_token)


@pytest.fixture(scope="module", params=["demo", "tiny"])
def tokenizer(request, tiny_model):
    from transformers import AutoTokenizer

    from evalfleet.types import DEMO_MODEL_DIR

    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR if request.param == "demo" else tiny_model)


def _tokenized(lm, monkeypatch, loglikelihood) -> list:
    seen: list = []
    monkeypatch.setattr(lm, "_loglikelihood_tokens", lambda reqs, disable_tqdm=False: seen.extend(reqs) or [])
    loglikelihood(_requests(PAIRS))
    return seen


@pytest.mark.parametrize("add_bos_token", [None, True, False])
def test_loglikelihood_pairs_are_lm_eval_s_tokens(tokenizer, monkeypatch, add_bos_token):
    lm = _lm(tokenizer, add_bos_token)
    ours = _tokenized(lm, monkeypatch, lm.loglikelihood)
    theirs = _tokenized(lm, monkeypatch, lambda requests: TemplateLM.loglikelihood(lm, requests, disable_tqdm=True))
    assert len(ours) == len(PAIRS)
    assert ours == theirs


def test_batched_strings_are_tok_encode_s(tokenizer):
    lm = _lm(tokenizer)
    texts = [pair[0] + pair[1] for pair in PAIRS] + ["<s>", ""]
    encoded = lm._encode_many(texts)
    assert encoded == {text: lm.tok_encode(text) for text in texts}
    plain = lm._encode_many(texts, add_special_tokens=False)
    assert plain == {text: lm.tok_encode(text, add_special_tokens=False) for text in texts}


def test_generation_contexts_keep_their_last_tokens(tokenizer, monkeypatch):
    lm = _lm(tokenizer)
    seen: list = []
    monkeypatch.setattr(lm, "_execute", lambda phase, items: seen.extend(items) or [""] * len(items))
    long = "a long context that runs past the room left for generating " * 3
    lm.generate_until(_requests([(long, {"until": ["\n"], "max_gen_toks": 8}), ("short", {"max_gen_toks": 24})]))
    assert seen[0].context == tuple(lm.tok_encode(long, left_truncate_len=24 - 8))
    assert len(seen[0].context) == 16 < len(lm.tok_encode(long))
    assert seen[1].context == tuple(lm.tok_encode("short"))  # no room left: lm-eval keeps it whole
