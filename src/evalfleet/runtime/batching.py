"""Length-sorted batches bounded by a token budget.

A batch costs (its longest sequence) × (its size) tokens once padded. Sorting longest first
packs similar lengths together, so little is wasted on padding, and an out-of-memory error,
if any, comes with the first batch rather than the last.
"""

from __future__ import annotations

from collections.abc import Sequence

from evalfleet.runtime.backends.base import Item

DEFAULT_TOKEN_BUDGET = {"cpu": 4096, "cuda": 65536}


def default_token_budget(device: str) -> int:
    return DEFAULT_TOKEN_BUDGET["cuda" if device.startswith("cuda") else "cpu"]


def make_batches(items: Sequence[Item], token_budget: int, max_batch_size: int | None = None) -> list[list[int]]:
    """Indices of `items`, grouped into batches; every batch holds at least one item."""
    order = sorted(range(len(items)), key=lambda i: (-items[i].length, i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for index in order:
        length = items[index].length
        grown_width = max(width, length)
        too_many = max_batch_size is not None and len(current) >= max_batch_size
        if current and (too_many or grown_width * (len(current) + 1) > token_budget):
            batches.append(current)
            current, grown_width = [], length
        current.append(index)
        width = grown_width
    if current:
        batches.append(current)
    return batches
