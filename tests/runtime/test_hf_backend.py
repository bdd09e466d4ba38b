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
    monkeypatch.setattr(HFBackend, "_packed_mask", lambda self, segment: torch.zeros(segment.shape[0], 1, segment.shape[1], segment.shape[1]))
    backend.share_prefixes, backend._packing_checked = True, False
    assert backend.loglikelihood(items) == expected
    assert backend.share_prefixes is False
