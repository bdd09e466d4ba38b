"""Length-sorted batches bounded by a token budget.

A batch costs (its longest sequence) × (its size) tokens once padded. Sorting longest first
packs similar lengths together, so little is wasted on padding, and an out-of-memory error,
if any, comes with the first batch rather than the last.
"""

from __future__ import annotations

from collections.abc import Sequence

from evalfleet.runtime.backends.base import Item, LoglikelihoodItem

DEFAULT_TOKEN_BUDGET = {"cpu": 4096, "cuda": 65536}


def default_token_budget(device: str) -> int:
    return DEFAULT_TOKEN_BUDGET["cuda" if device.startswith("cuda") else "cpu"]


def make_batches(
    items: Sequence[Item], token_budget: int, max_batch_size: int | None = None, share_prefixes: bool = False
) -> list[list[int]]:
    """Indices of `items`, grouped into batches; every batch holds at least one item.

    With `share_prefixes`, log-likelihood items with the same context stay together and count
    as one padded row (the context once, then each continuation), as the backend packs them.
    """
    rows: dict[object, list[int]] = {}
    for index, item in enumerate(items):
        key = item.context if share_prefixes and isinstance(item, LoglikelihoodItem) else index
        rows.setdefault(key, []).append(index)
    if max_batch_size is not None:
        chunks = [members[i : i + max_batch_size] for members in rows.values() for i in range(0, len(members), max_batch_size)]
    else:
        chunks = list(rows.values())
    widths = [_row_width(items, members) for members in chunks]
    order = sorted(range(len(chunks)), key=lambda c: (-widths[c], chunks[c][0]))
    batches: list[list[int]] = []
    current: list[int] = []
    current_rows = 0
    width = 0
    for chunk in order:
        grown_width = max(width, widths[chunk])
        too_many = max_batch_size is not None and len(current) + len(chunks[chunk]) > max_batch_size
        if current and (too_many or grown_width * (current_rows + 1) > token_budget):
            batches.append(current)
            current, current_rows, grown_width = [], 0, widths[chunk]
        current.extend(chunks[chunk])
        current_rows += 1
        width = grown_width
    if current:
        batches.append(current)
    return batches


def _row_width(items: Sequence[Item], members: list[int]) -> int:
    first = items[members[0]]
    if len(members) == 1:
        return first.length
    return len(first.context) + sum(len(items[i].continuation) for i in members)  # type: ignore[union-attr]
