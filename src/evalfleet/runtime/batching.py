"""Length-sorted batches bounded by a token budget, with shared prefixes kept together.

A batch costs (its longest sequence) × (its size) tokens once padded. Sorting longest first
packs similar lengths together, so little is wasted on padding, and an out-of-memory error,
if any, comes with the first batch rather than the last.

Few-shot tasks start every question with the same examples. When the backend reuses a shared
prefix across requests, questions whose contexts share a long prefix are batched together
(found by sorting the contexts, which puts a prefix tree's leaves side by side), and such a
batch costs the prefix once plus its rows' remainders.
"""

from __future__ import annotations

from collections.abc import Sequence

from evalfleet.runtime.backends.base import Item, LoglikelihoodItem

DEFAULT_TOKEN_BUDGET = {"cpu": 4096, "cuda": 65536}
# Rows a continuously batched generation decodes at once unless the run's batch size says fewer
# (vLLM's default too); memory usually limits them first (backends/decode.py).
MAX_ROWS = 256
# A shared prefix shorter than this is not worth a separate forward pass and a cache copy.
MIN_SHARED_PREFIX = 16


def default_token_budget(device: str) -> int:
    return DEFAULT_TOKEN_BUDGET["cuda" if device.startswith("cuda") else "cpu"]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def shared_prefix_length(contexts: Sequence[Sequence[int]]) -> int:
    """Tokens every context starts with, leaving each at least its last token (which predicts the answer)."""
    ordered = sorted(contexts)
    shared = common_prefix_length(ordered[0], ordered[-1])
    return min(shared, min(len(c) for c in contexts) - 1)


def make_batches(
    items: Sequence[Item],
    token_budget: int,
    max_batch_size: int | None = None,
    share_prefixes: bool = False,
    reuse_prefixes: bool = False,
) -> list[list[int]]:
    """Indices of `items`, grouped into batches; every batch holds at least one item.

    With `share_prefixes`, log-likelihood items with the same context stay together and count
    as one padded row (the context once, then each continuation), as the backend packs them.
    With `reuse_prefixes` too, rows whose contexts share a long prefix are batched together.
    """
    rows: dict[object, list[int]] = {}
    for index, item in enumerate(items):
        key = item.context if share_prefixes and isinstance(item, LoglikelihoodItem) else index
        rows.setdefault(key, []).append(index)
    chunks = _split(list(rows.values()), max_batch_size)
    if not (share_prefixes and reuse_prefixes and items and isinstance(items[0], LoglikelihoodItem)):
        return _pack(items, chunks, token_budget, max_batch_size)
    batches: list[list[int]] = []
    lonely: list[list[int]] = []
    for group in _prefix_groups(items, chunks):
        if len(group) == 1:
            lonely.extend(group)
        else:
            prefix = shared_prefix_length([items[c[0]].context for c in group])  # type: ignore[union-attr]
            batches.extend(_pack(items, group, token_budget, max_batch_size, prefix))
    return batches + _pack(items, lonely, token_budget, max_batch_size)


def _split(chunks: list[list[int]], max_batch_size: int | None) -> list[list[int]]:
    if max_batch_size is None:
        return chunks
    return [members[i : i + max_batch_size] for members in chunks for i in range(0, len(members), max_batch_size)]


def _prefix_groups(items: Sequence[Item], chunks: list[list[int]]) -> list[list[list[int]]]:
    """Rows grouped by a shared prefix of at least MIN_SHARED_PREFIX tokens (leaves of one subtree).

    Contexts sorted as token sequences put every subtree's leaves side by side; a row joins the
    group while it shares enough with the group's first row and at least half of what the group
    already shares, so one stray near-match does not shrink a long few-shot prefix.
    """
    ordered = sorted(chunks, key=lambda c: (items[c[0]].context, c[0]))
    groups: list[list[list[int]]] = []
    shared = 0
    for chunk in ordered:
        context = items[chunk[0]].context
        if groups:
            first = items[groups[-1][0][0]].context
            common = common_prefix_length(first, context)
            limit = MIN_SHARED_PREFIX if len(groups[-1]) == 1 else max(MIN_SHARED_PREFIX, shared // 2)
            if common >= limit:
                shared = common if len(groups[-1]) == 1 else min(shared, common)
                groups[-1].append(chunk)
                continue
        groups.append([chunk])
    return groups


def _pack(
    items: Sequence[Item], chunks: list[list[int]], token_budget: int, max_batch_size: int | None, prefix: int = 0
) -> list[list[int]]:
    """Rows into batches, longest first, each within `token_budget` (a prefix counted once)."""
    widths = [_row_width(items, members) - prefix for members in chunks]
    order = sorted(range(len(chunks)), key=lambda c: (-widths[c], chunks[c][0]))
    batches: list[list[int]] = []
    current: list[int] = []
    current_rows = 0
    width = 0
    for chunk in order:
        grown_width = max(width, widths[chunk])
        too_many = max_batch_size is not None and len(current) + len(chunks[chunk]) > max_batch_size
        if current and (too_many or prefix + grown_width * (current_rows + 1) > token_budget):
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
