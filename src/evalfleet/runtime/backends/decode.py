"""Continuous batching for generation on a transformers model: rows leave when they stop.

A static batch decodes until its longest row stops, and every row that stopped earlier keeps
costing a step. Here each row leaves the batch at its stop string, an end-of-sequence token or
its token limit, and waiting requests take its room (up to the rows and padded tokens the static
batch would have held). Newcomers are prefilled together, their few-shot prefix computed once
when they share one, and their KV cache joins the running one: both are left-padded to one
width, and an attention mask and explicit positions keep every row exactly as if it ran alone.
Columns no row needs any more are cut off the left.

Each row is chosen as transformers' `generate` chooses it: greedy argmax, or for a sampling
row its own seeded draw (`sampling.py`), and its text is decoded and cut at its first stop
string the same way, so the generations equal the static batches' and lm-eval's `hf`.

transformers' own continuous batching (`generate_batch`, paged attention) was measured on the
CPU and not used: 32 short prompts on the demo model took 6.2 s there against 0.035 s for one
static `generate` call, and it has no stop strings.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from evalfleet.runtime.backends import cascade
from evalfleet.runtime.backends.base import GenerationItem, OutOfMemory
from evalfleet.runtime.backends.sampling import SeededSampler
from evalfleet.runtime.batching import MIN_SHARED_PREFIX, common_prefix_length, shared_prefix_length

# Generation settings that make `generate` change the scores before it picks; a model whose
# generation config sets one of them decodes with `generate` itself (static batches).
SCORE_CHANGING = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "renormalize_logits": (None, False),
}
# The share of the memory free when a generation run starts that its KV cache may take, unless a
# budget is given (after an out-of-memory error, half the cache that failed).
CACHE_SHARE = 0.25
ROOM = 64  # columns a running cache keeps free on its right (at least its length: it doubles)
STOP_WINDOW = 8  # stop strings are looked for in the text of a row's last tokens
# Scores with a shared prefix and without differ by float rounding only, a wrong prefix by far more:
# measured on the demo model and a random NeoX, at most 4.4e-6 relative in float32 (0 in bfloat16 on
# the CPU) against 2.0 to 6.1 for a prefix cache one token off. The bound leaves room for bfloat16
# on a GPU, as the log-likelihood packing check's does.
PREFIX_TOLERANCE = 2e-2
log = logging.getLogger("evalfleet")


def decodes_plainly(generation_config: Any) -> bool:
    """Whether greedy `generate` on this config is a bare argmax (no penalties, no forced tokens)."""
    return all(getattr(generation_config, name, None) in plain for name, plain in SCORE_CHANGING.items())


def end_tokens(generation_config: Any) -> set[int]:
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(token) for token in eos}


def meets_stop(item: GenerationItem, text: str) -> bool:
    """Whether `text` (a row's last tokens, decoded) holds one of the item's stop strings."""
    return any(stop and stop in text for stop in item.until)


def finished_text(tokenizer: Any, item: GenerationItem, tokens: Sequence[int]) -> str:
    """The row's text as the static path returns it: special tokens dropped, cut at its first stop string."""
    text = tokenizer.decode(list(tokens[: item.max_new_tokens]), skip_special_tokens=True)
    for term in item.until:
        if term:
            text = text.split(term)[0]
    return text


@dataclass
class _Row:
    index: int
    item: GenerationItem
    position: int  # where the row's next input token sits (its context's length, then one more per token)
    sampler: SeededSampler | None
    tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stop_characters = frozenset("".join(self.item.until))


@dataclass
class _Shared:
    """A prefix every running row starts with, its keys and values once ([1, kv_heads, length, dim]
    per layer); the rows' cache and mask hold only what follows it (cascade.py)."""

    tokens: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    def starts(self, context: Sequence[int]) -> bool:
        """Whether a prompt continues this prefix (with a token of its own to predict from)."""
        return len(context) > len(self.tokens) and tuple(context[: len(self.tokens)]) == self.tokens


class ContinuousDecoder:
    """Decodes `items` with rows joining and leaving; `on_done(index, text)` as each row stops.

    Three limits hold at once: `max_rows` rows; newcomers prefilled together within
    `prefill_tokens` padded tokens (a shared prefix counted once), as a log-likelihood batch; and
    a KV cache of at most `cache_tokens` padded tokens, each row counted at its context plus its
    whole token limit. Without `cache_tokens`, the cache may take CACHE_SHARE of the memory free
    when the run starts, in tokens of the size the first prefill's cache measures.
    `in_flight` holds the requests being decoded or prefilled, so that a caller whose device ran
    out of memory knows how large the batch was.
    """

    def __init__(self, backend: Any, max_rows: int, prefill_tokens: int, cache_tokens: int | None = None) -> None:
        self.backend = backend
        self.model = backend.model
        self.max_rows = max(1, max_rows)
        self.prefill_tokens = prefill_tokens
        self.cache_tokens = cache_tokens
        self.free_at_start = free_memory(backend.device) if cache_tokens is None else 0
        self.eos = end_tokens(self.model.generation_config)
        self.active: list[_Row] = []
        self.joining: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, width]: 1 where the cache holds a real token
        self.full = False  # the last admission stopped at a limit: wait until a quarter of the rows left
        self.left = 0  # rows that left since then
        # the prefix the running rows share, held once (models attending through cascade.py); a
        # newcomer that does not continue it makes every row hold it (`_unshare`)
        self.shared: _Shared | None = None
        self.kept: _Shared | None = None  # the last prefix computed, for the next batch that shares it

    @torch.inference_mode()
    def run(self, items: Sequence[GenerationItem], on_done: Callable[[int, str], None]) -> None:
        waiting = deque(range(len(items)))
        while waiting or self.active:
            self.joining = self._admit(items, waiting)
            if self.joining:
                self._prefill(self.joining)
                self.joining = []
            else:
                self._step()
            self._retire(on_done)

    @property
    def in_flight(self) -> list[GenerationItem]:
        return [row.item for row in (*self.active, *self.joining)]

    @staticmethod
    def _reserved(rows: Sequence[GenerationItem], held: int = 0) -> int:
        """The padded cache tokens `rows` may come to, with a prefix of `held` tokens held once (cascade.py)."""
        return len(rows) * max(len(item.context) - held + item.max_new_tokens for item in rows) + held

    def _admit(self, items: Sequence[GenerationItem], waiting: deque[int]) -> list[_Row]:
        """Waiting rows that fit beside the active ones. Once the batch was full, newcomers wait until
        a quarter of its rows left, so that a prefill (and the copy of the running cache that joins
        it) serves several rows rather than one per step."""
        running = [row.item for row in self.active]
        if not waiting or (running and self.full):
            return []
        taken: list[GenerationItem] = []
        order: list[int] = []
        shared = 0
        self.full = False
        while waiting:
            if len(running) + len(taken) >= self.max_rows:
                self.full, self.left = True, 0
                break
            candidate = items[waiting[0]]
            if running or taken:
                joins = running and self.shared is not None and self.shared.starts(candidate.context)
                if taken:  # the prefix every newcomer so far shares, which their prefill computes once
                    shared = common_prefix_length(taken[0].context[: shared if len(taken) > 1 else None], candidate.context)
                prefix = (
                    len(self.shared.tokens) if joins and self.shared is not None
                    else self._prefix_to_share(shared, [item.context for item in (*taken, candidate)])
                )
                if self._reserved([*running, *taken, candidate], prefix if joins or self._holds_new_prefixes(running) else 0) > self._cache_limit():
                    self.full, self.left = True, 0
                    break
                if running and self.shared is not None and not joins:
                    self._unshare()
                width = max(len(item.context) for item in (*taken, candidate)) - prefix
                if taken and prefix + width * (len(taken) + 1) > self.prefill_tokens:
                    break
            taken.append(candidate)
            order.append(waiting.popleft())
        return [
            _Row(i, items[i], len(items[i].context), SeededSampler([items[i]], self.model.generation_config) if items[i].sampling else None)
            for i in order
        ]

    def _holds_new_prefixes(self, running: Sequence[GenerationItem]) -> bool:
        """Whether a batch of newcomers alone will hold its shared prefix once: the backend attends
        through cascade.py and its first shared prefix was found to give whole prompts' scores
        (before that check, and after a fallback, a prefix counts once per row)."""
        backend = self.backend
        return not running and bool(getattr(backend, "cascade", False)) and backend.generation_prefix_checked and backend.reuse_prefixes

    def _unshare(self) -> None:
        """A newcomer does not continue the running rows' prefix: every running row takes the
        prefix's keys and values into its own cache, and the batch goes on without one."""
        assert self.shared is not None and self.cache is not None and self.mask is not None
        rows, length = self.mask.shape[0], len(self.shared.tokens)
        self.cache.layers = _remade(
            self.cache.layers,
            lambda layer, held: _RoomyLayer(cascade.beside(held[0], layer.keys), cascade.beside(held[1], layer.values)),
            self.shared.layers,
        )
        self.mask = torch.cat([self.mask.new_ones(rows, length), self.mask], dim=1)
        self.shared = None

    def _cache_limit(self) -> float:
        """The KV cache's room in tokens: as given, else measured on the first prefill's cache."""
        if self.cache_tokens is not None:
            return self.cache_tokens
        measured = getattr(self.backend, "cache_token_bytes", None)
        return CACHE_SHARE * self.free_at_start / measured if measured else float("inf")

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache, shared: _Shared | None = None
    ) -> torch.Tensor:
        """Last-position logits in float32, as `generate` scores them; the cache grows in place.
        With `shared`, the rows' cache and mask follow its prefix, which every row attends to first."""
        backend = self.backend
        kwargs: dict[str, Any] = {
            "input_ids": ids.to(backend.device),
            "attention_mask": mask.to(backend.device),
            "position_ids": positions.to(backend.device),
            backend._cache_arg: cache,
            "use_cache": True,
        }
        if backend._keeps_logits:
            kwargs["logits_to_keep"] = 1
        try:
            with cascade.sharing(shared.layers) if shared is not None else nullcontext():
                return self.model(**kwargs).logits[:, -1, :].float()
        except torch.OutOfMemoryError as error:
            raise OutOfMemory(str(error)) from error

    def _prefill(self, rows: list[_Row]) -> None:
        """The newcomers' contexts in one forward pass (a shared prefix once), then their first token.

        A batch of its own holds a shared prefix once (`_Shared`) where the model attends through
        cascade.py; newcomers to it are prefilled on that prefix. The first time a prefix is
        shared, four of the rows (the shortest, the longest and two between) are prefilled without
        it too, and their next-token scores must agree; where they do not (a model whose attention
        ignores the mask or the positions given), prompts are computed whole from then on."""
        contexts = [row.item.context for row in rows]
        if self.active and self.shared is not None:  # newcomers continue the running rows' prefix
            shared: _Shared | None = self.shared
            cache, mask, logits = self._prefilled(contexts, 0, shared)
        else:
            prefix = self._prefix_to_share(shared_prefix_length(contexts) if len(rows) > 1 else 0, contexts)
            # a batch of its own holds its prefix once; newcomers to a batch without one get it per row
            shared = self._shared(contexts[0][:prefix]) if prefix and not self.active and getattr(self.backend, "cascade", False) else None
            try:
                cache, mask, logits = self._prefilled(contexts, 0 if shared else prefix, shared)
            except cascade.CascadeUnsupported as error:
                log.warning("%s: %s; the shared prefix is held per row", self.backend.describe(), error)
                self.backend.cascade, shared = False, None
                cache, mask, logits = self._prefilled(contexts, prefix)
            if prefix and not self.backend.generation_prefix_checked:
                self.backend.generation_prefix_checked = True
                # the shortest and longest rows and two between, whole: padding and length both vary
                order = sorted(range(len(rows)), key=lambda r: len(contexts[r]))
                probe = sorted({order[round(k * (len(order) - 1) / 3)] for k in range(4)})
                whole = self._prefilled([contexts[r] for r in probe], 0)[2]
                if ((logits[probe] - whole).abs() > PREFIX_TOLERANCE * (1 + whole.abs())).any():
                    log.warning("%s: a shared prefix changes generation scores; computing each prompt whole", self.backend.describe())
                    self.backend.reuse_prefixes = False
                    (cache, mask, logits), shared = self._prefilled(contexts, 0), None
        if getattr(self.backend, "cache_token_bytes", None) is None:
            self.backend.cache_token_bytes = cache_bytes(cache) / mask.numel()
        self._join(rows, cache, mask, shared)
        self._choose(rows, logits)

    def _shared(self, tokens: tuple[int, ...]) -> _Shared:
        """The prefix's keys and values, computed once (and again only for another prefix)."""
        if self.kept is None or self.kept.tokens != tuple(tokens):
            cache = self.backend._prefix_cache(tuple(tokens), 1)
            self.kept = _Shared(tuple(tokens), [(layer.keys, layer.values) for layer in cache.layers])
        return self.kept

    def _prefix_to_share(self, shared: int, contexts: Sequence[tuple[int, ...]]) -> int:
        """The part of a `shared` prefix a prefill computes once: none when the backend does not
        reuse prefixes or it is shorter than MIN_SHARED_PREFIX; every row keeps a token to predict from."""
        prefix = min(shared, min(len(c) for c in contexts) - 1) if self.backend.reuse_prefixes else 0
        return prefix if prefix >= MIN_SHARED_PREFIX else 0

    def _prefilled(
        self, contexts: list[tuple[int, ...]], prefix: int, shared: _Shared | None = None
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """The contexts' cache, mask and last scores: the first `prefix` tokens (shared) once, then
        each row's rest, left-padded; with `shared`, only the rest after its prefix, which stays
        out of the rows' cache and mask."""
        start = len(shared.tokens) if shared is not None else prefix
        tails = [list(c[start:]) for c in contexts]
        width = max(len(t) for t in tails)
        ids = torch.full((len(contexts), width), self.backend.pad_id, dtype=torch.long)
        mask = torch.zeros((len(contexts), prefix + width), dtype=torch.long)
        positions = torch.zeros((len(contexts), width), dtype=torch.long)
        mask[:, :prefix] = 1
        for r, tail in enumerate(tails):
            ids[r, width - len(tail) :] = torch.tensor(tail, dtype=torch.long)
            mask[r, prefix + width - len(tail) :] = 1
            positions[r, width - len(tail) :] = torch.arange(start, start + len(tail))
        cache = self.backend._prefix_cache(contexts[0][:prefix], len(contexts)) if prefix else self.backend.new_cache()
        return cache, mask, self._forward(ids, mask, positions, cache, shared)

    def _join(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor, shared: _Shared | None) -> None:
        """The newcomers' cache and mask beside the running ones, both left-padded to one width
        (newcomers to a batch with a shared prefix were prefilled on it)."""
        if self.cache is None or self.mask is None or not self.active:
            self.cache, self.mask, self.active, self.shared = cache, mask, list(rows), shared
            self.cache.layers = _remade(cache.layers, lambda layer: _RoomyLayer(layer.keys, layer.values))
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.cache.layers = _remade(
            self.cache.layers,
            lambda old, new: _RoomyLayer(
                torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)]),
                torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)]),
            ),
            cache.layers,
        )
        self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)), F.pad(mask, (width - mask.shape[1], 0))])
        self.active.extend(rows)

    def _step(self) -> None:
        """One token for every active row."""
        assert self.cache is not None and self.mask is not None
        ids = torch.tensor([[row.tokens[-1]] for row in self.active], dtype=torch.long)
        positions = torch.tensor([[row.position] for row in self.active], dtype=torch.long)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.active), 1)], dim=1)
        logits = self._forward(ids, self.mask, positions, self.cache, self.shared)
        for row in self.active:
            row.position += 1
        self._choose(self.active, logits)
        self.backend.decode_steps += 1
        self.backend.decoded_rows += len(self.active)

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> None:
        picked = logits.argmax(-1).tolist()
        for r, row in enumerate(rows):
            if row.sampler is not None:
                drawn = row.sampler(torch.tensor(row.tokens[-1:] or [0]).view(1, -1), logits[r : r + 1])  # type: ignore[arg-type]
                picked[r] = int(drawn.argmax(-1))
            row.tokens.append(int(picked[r]))

    def _retire(self, on_done: Callable[[int, str], None]) -> None:
        """Rows that stopped are reported and leave the batch at once: the last running rows move
        into their places (one row's keys and values copied each), and the columns no row needs
        any more are cut off the left (a view, no copy). Newcomers may join again once a quarter
        of the batch has left since the last admission stopped at a limit."""
        ended = [len(row.tokens) >= row.item.max_new_tokens or row.tokens[-1] in self.eos for row in self.active]
        # only a row whose new token may complete a stop string has its window decoded
        asked = [row for row, end in zip(self.active, ended, strict=True) if not end and self._may_stop(row)]
        windows = self.backend.tokenizer.batch_decode([row.tokens[-STOP_WINDOW:] for row in asked]) if asked else []
        stopped = {id(row) for row, text in zip(asked, windows, strict=True) if meets_stop(row.item, text)}
        gone = [r for r, (row, end) in enumerate(zip(self.active, ended, strict=True)) if end or id(row) in stopped]
        for r in gone:
            row = self.active[r]
            on_done(row.index, finished_text(self.backend.tokenizer, row.item, row.tokens))
        if not gone:
            return
        if len(gone) == len(self.active):
            self.active, self.cache, self.mask, self.shared = [], None, None, None
            return
        assert self.cache is not None and self.mask is not None
        count = len(self.active) - len(gone)
        # the rows past the new count that still run fill the places of those gone before it
        leaving = set(gone)
        moves = list(zip((r for r in range(count, len(self.active)) if r not in leaving), (r for r in gone if r < count)))
        for source, target in moves:
            self.active[target] = self.active[source]
            self.mask[target] = self.mask[source]
        del self.active[count:]
        self.left += len(gone)
        if self.left * 3 >= count:  # a quarter of the rows left
            self.full = False
        mask = self.mask[:count]
        start = int((mask.sum(0) > 0).long().argmax())  # columns padding in every remaining row go
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.keep(moves, count, start)

    def _may_stop(self, row: _Row) -> bool:
        """Whether the row's newest token can have completed one of its stop strings: its text
        shares a character with them (alone, and after a token, where a tokenizer that drops a
        leading space keeps it), or is empty or part of a character (its bytes decode with the
        tokens around it). A stop string that appears must end in the newest token's text."""
        texts: dict[int, str] = self.backend.token_texts
        token = row.tokens[-1]
        if token not in texts:
            texts[token] = self.backend.tokenizer.decode([token]) + self.backend.tokenizer.decode([token, token])
        text = texts[token]
        return not text or "\ufffd" in text or not row.stop_characters.isdisjoint(text)


class _RoomyLayer(DynamicLayer):
    """A plain cache layer whose keys and values are views of buffers with room on the right, so a
    decode step writes its column in place (transformers' layer concatenates: a copy of the whole
    cache per step, about 40% of a step on the CPU)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True
        self._hold(keys, values)

    def _hold(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copies keys and values into buffers with room (the view's rows and columns only)."""
        length = keys.shape[2]
        room = max(ROOM, length)  # doubling: a row's growth costs one copy per doubling
        self.rows = keys.shape[0]
        self._keys = keys.new_empty(self.rows, keys.shape[1], length + room, keys.shape[3])
        self._values = values.new_empty(self.rows, values.shape[1], length + room, values.shape[3])
        self._keys[:, :, :length], self._values[:, :, :length] = keys, values
        self.first, self.used = 0, length
        self._view()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        added = key_states.shape[-2]
        if self.used + added > self._keys.shape[2]:
            self._hold(self.keys, self.values)
        self._keys[: self.rows, :, self.used : self.used + added] = key_states
        self._values[: self.rows, :, self.used : self.used + added] = value_states
        self.used += added
        self._view()
        return self.keys, self.values

    def keep(self, moves: Sequence[tuple[int, int]], rows: int, start: int) -> None:
        """The first `rows` rows stay, after each (source, target) row was copied into its target's
        place; the `start` columns on the left go (the view moves, nothing is copied)."""
        for source, target in moves:
            self._keys[target, :, self.first : self.used] = self._keys[source, :, self.first : self.used]
            self._values[target, :, self.first : self.used] = self._values[source, :, self.first : self.used]
        self.rows, self.first = rows, self.first + start
        self._view()

    def _view(self) -> None:
        self.keys = self._keys[: self.rows, :, self.first : self.used]
        self.values = self._values[: self.rows, :, self.first : self.used]


def _remade(layers: list[Any], make: Callable[..., Any], *beside: Sequence[Any]) -> list[Any]:
    """`make(layer, *its partners in beside)` for each layer that holds keys; a layer that holds
    none is kept as it is (a pipeline stage's cache holds its own layers only)."""
    return [make(layer, *rest) if layer.is_initialized else layer for layer, *rest in zip(layers, *beside, strict=True)]


def cache_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers if layer.is_initialized for t in (layer.keys, layer.values))


def free_memory(device: torch.device) -> int:
    """Bytes free now on `device` (the process's host memory for the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, heads, length, dim] padded with zeros on the left of `length` to `width`."""
    return F.pad(tensor, (0, 0, width - tensor.shape[2], 0))


def plain_cache(model: Any) -> bool:
    """Whether the model's cache is transformers' plain per-layer one (no sliding windows, no states),
    the only kind whose rows and columns the decoder cuts and joins."""
    probe = DynamicCache(config=model.config)
    return bool(probe.layers) and all(type(layer) is DynamicLayer for layer in probe.layers)
