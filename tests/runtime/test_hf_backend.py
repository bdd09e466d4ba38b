"""The HF backend's shared-context packing, and its guard against attention that ignores the mask."""

from __future__ import annotations

import random

import pytest
import torch

from evalfleet.runtime.backends.base import LoglikelihoodItem
from evalfleet.runtime.backends.hf import HFBackend


@pytest.fixture(scope="module")
def backend(tiny_model):
    return HFBackend.load(str(tiny_model), dtype="float32", device="cpu")


def _items(seed: int = 5) -> list[LoglikelihoodItem]:
    rng = random.Random(seed)
    items = []
    for _ in range(5):
        context = tuple(rng.randrange(5, 300) for _ in range(rng.randint(1, 30)))
        for _ in range(rng.randint(2, 4)):
            items.append(LoglikelihoodItem(context, tuple(rng.randrange(5, 300) for _ in range(rng.randint(1, 5)))))
    return items


def test_packed_rows_score_like_single_items(backend):
    items = _items()
    alone = [backend._loglikelihood_plain([item])[0] for item in items]
    backend.share_prefixes, backend._packing_checked = True, False
    packed = backend.loglikelihood(items)
    assert backend.share_prefixes and backend._packing_checked
    for (a, greedy_a), (b, greedy_b) in zip(alone, packed, strict=True):
        assert abs(a - b) <= 1e-4 + 1e-5 * abs(a) and greedy_a == greedy_b


def test_a_mask_the_model_ignores_turns_packing_off(backend, monkeypatch):
    """Plant the bug a fused kernel would cause: continuations see everything, even each other."""
    items = _items(seed=9)
    expected = backend._loglikelihood_plain(items)
    monkeypatch.setattr(HFBackend, "_packed_mask", lambda self, segment, prefix=0: torch.zeros(segment.shape[0], 1, segment.shape[1], prefix + segment.shape[1]))
    backend.share_prefixes, backend._packing_checked = True, False
    assert backend.loglikelihood(items) == expected
    assert backend.share_prefixes is False


def _few_shot_items(seed: int = 3, questions: int = 6) -> list[LoglikelihoodItem]:
    """Questions behind one shared 40-token prefix, with 1 to 4 choices of 1 to 4 tokens."""
    rng = random.Random(seed)
    shared = tuple(rng.randrange(5, 300) for _ in range(40))
    items = []
    for _ in range(questions):
        context = shared + tuple(rng.randrange(5, 300) for _ in range(rng.randint(1, 12)))
        for _ in range(rng.randint(1, 4)):
            items.append(LoglikelihoodItem(context, tuple(rng.randrange(5, 300) for _ in range(rng.randint(1, 4)))))
    return items


@pytest.fixture
def reusing(backend):
    backend.share_prefixes = backend.reuse_prefixes = True
    backend._packing_checked = False
    yield backend
    backend.reuse_prefixes = False


def test_a_reused_prefix_scores_like_single_items(reusing):
    items = _few_shot_items()
    alone = [reusing._loglikelihood_plain([item])[0] for item in items]
    assert reusing._reusable_prefix(items) == 40
    shared = reusing.loglikelihood(items)
    assert reusing.reuse_prefixes and reusing._packing_checked
    for (a, greedy_a), (b, greedy_b) in zip(alone, shared, strict=True):
        assert abs(a - b) <= 1e-4 + 1e-5 * abs(a) and greedy_a == greedy_b


def test_no_shared_prefix_means_no_prefix_pass(reusing, monkeypatch):
    monkeypatch.setattr(HFBackend, "_prefix_cache", lambda *args: pytest.fail("no prefix is shared"))
    items = _items()
    assert reusing._reusable_prefix(items) == 0
    assert len(reusing.loglikelihood(items)) == len(items)


def test_a_wrong_offset_after_the_prefix_turns_reuse_off(reusing, monkeypatch):
    """Planted fault: positions after the prefix start one late. Unchecked it changes scores; the guard catches it."""
    items = _few_shot_items(seed=8)
    expected = reusing._loglikelihood_plain(items)
    monkeypatch.setattr(HFBackend, "_position_offset", lambda self, prefix: prefix + 1)
    reusing._packing_checked = True
    wrong = reusing.loglikelihood(items)
    assert max(abs(a - b) for (a, _), (b, _) in zip(expected, wrong, strict=True)) > 1e-2
    reusing._packing_checked = False
    assert reusing.loglikelihood(items) == expected
    assert reusing.reuse_prefixes is False
