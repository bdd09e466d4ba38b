"""Where batches are computed: in this process, or in worker groups (see `workers.py`).

The runtime hands a runner a list of batches and a callback. The runner calls back once
per finished batch, in any order; the callback commits results to the request cache
before they count as done. A runner never sees strings or tasks, only token batches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from evalfleet.runtime.backends.base import Backend, GenerationItem, Item, OutOfMemory
from evalfleet.runtime.batching import MAX_ROWS
from evalfleet.types import ResourceError

BatchCallback = Callable[[int, list[Any]], None]


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` says the device (or, on the CPU, the process) ran out of memory.

    torch raises `OutOfMemoryError` for CUDA, but a failed CPU allocation is a plain
    RuntimeError from its CPU allocator.
    """
    if isinstance(error, OutOfMemory | MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error)


def padded_tokens(items: Sequence[Item]) -> int:
    return len(items) * max(item.length for item in items)


def first_chunk(items: Sequence[Item], budget: int | None) -> list[Item]:
    """The longest prefix of `items` whose padded size fits `budget` (at least one item)."""
    if budget is None:
        return list(items)
    count = 1
    while count < len(items) and padded_tokens(items[: count + 1]) <= budget:
        count += 1
    return list(items[:count])


def halved_budget(chunk: Sequence[Item], where: str) -> int:
    """The token budget after `chunk` ran out of memory on `where` (every runner keeps it for the rest
    of the job): half the chunk's padded size. A single request cannot be halved: a ResourceError."""
    if len(chunk) == 1:
        raise ResourceError(f"one request of {chunk[0].length} tokens does not fit in memory on {where}")
    return padded_tokens(chunk) // 2


def compute(backend: Backend, batch: Sequence[Item], stream: dict[str, int] | None = None) -> list[Any]:
    """One batch on one backend; a batch is all log-likelihood items or all generation items.
    `stream` (`rows`, `prefill_tokens`): generation batches merged into this one call (a dp
    replica's rank gets them so), decoded as one stream by a backend that batches continuously."""
    if isinstance(batch[0], GenerationItem):
        if stream and getattr(backend, "continuous", False):
            return streamed(backend, batch, stream["rows"], stream["prefill_tokens"])
        return list(backend.generate(list(batch)))
    return list(backend.loglikelihood(list(batch)))


def streamed(backend: Backend, items: Sequence[Item], rows: int, prefill_tokens: int) -> list[Any]:
    """Generation items decoded as one stream by the single-device runner's loop: at most `rows` at
    once, newcomers prefilled within `prefill_tokens`; out of memory halves the budget and goes on
    with the rows not yet done; the halved budget holds for the backend's later calls, and the
    backend counts the halvings (`stream_halvings`, which the rank reports to the driver)."""
    runner = InProcessRunner(backend, str(getattr(backend, "device", "cpu")))
    runner.generation_rows, runner.token_budget = rows, backend.stream_budget
    results: list[Any] = []
    try:
        runner._run_continuous([items], lambda _, texts: results.extend(texts), prefill_tokens)
    finally:
        backend.stream_budget = runner.token_budget
        backend.stream_halvings += runner.oom_halvings
    return results


class BatchRunner(ABC):
    """Computes batches somewhere and reports each one as it finishes."""

    # The run's batch size, where it set one: the most rows a continuously batched generation
    # holds at once (its static batches are already cut to it).
    generation_rows: int | None = None

    @abstractmethod
    def run(self, batches: Sequence[Sequence[Item]], on_batch_done: BatchCallback) -> None:
        """Compute every batch; call `on_batch_done(index, results)` once per batch."""

    @property
    @abstractmethod
    def max_length(self) -> int:
        """Longest sequence the model behind this runner takes."""

    @property
    def shares_prefixes(self) -> bool:
        """Whether the backend packs items with a common context into one row (see batching)."""
        return False

    @property
    def reuses_prefixes(self) -> bool:
        """Whether the backend computes a prefix shared by a batch's contexts once (see batching)."""
        return False

    def describe(self) -> dict[str, Any]:
        """The layout and devices used, for results.json."""
        return {}

    def close(self) -> None:
        """Release processes and memory. Safe to call twice."""


class InProcessRunner(BatchRunner):
    """One backend in this process: the lightweight engine's runner."""

    def __init__(self, backend: Backend, device: str) -> None:
        self.backend = backend
        self.device = device
        self.token_budget: int | None = None
        self.oom_halvings = 0

    @property
    def max_length(self) -> int:
        return self.backend.max_length

    @property
    def shares_prefixes(self) -> bool:
        return bool(getattr(self.backend, "share_prefixes", False))

    @property
    def reuses_prefixes(self) -> bool:
        return bool(getattr(self.backend, "reuse_prefixes", False))

    def run(self, batches: Sequence[Sequence[Item]], on_batch_done: BatchCallback) -> None:
        """Each batch in pieces that fit the token budget; out of memory halves the budget for
        the rest of the job, so later batches do not fail the same way first."""
        if batches and isinstance(batches[0][0], GenerationItem) and getattr(self.backend, "continuous", False):
            self._run_continuous(batches, on_batch_done)
            return
        for index, batch in enumerate(batches):
            results: list[Any] = []
            start = 0
            while start < len(batch):
                chunk = first_chunk(batch[start:], self.token_budget)
                try:
                    results.extend(compute(self.backend, chunk))
                except Exception as error:
                    if not out_of_memory(error):
                        raise
                    self.token_budget = halved_budget(chunk, self.device)
                    self.oom_halvings += 1
                    continue
                start += len(chunk)
            on_batch_done(index, results)

    def _run_continuous(self, batches: Sequence[Sequence[Item]], on_batch_done: BatchCallback,
                        prefill_tokens: int | None = None) -> None:
        """Generation batches as one stream whose rows leave as they stop (see backends/decode.py):
        newcomers prefilled within `prefill_tokens`, else the largest batch's padded size, rows
        decoded together as the free memory allows, up to the run's batch size; a batch is
        reported once its last row is done. Out of memory halves the budget, for the prefill and
        the cache, and goes on with the rows not yet done."""
        owners = [(b, i) for b, batch in enumerate(batches) for i in range(len(batch))]
        results: list[list[Any]] = [[None] * len(batch) for batch in batches]
        left = [len(batch) for batch in batches]
        remaining = list(range(len(owners)))
        finished: set[int] = set()
        while remaining:
            prefill = prefill_tokens or max(padded_tokens(batch) for batch in batches)
            if self.token_budget is not None:
                prefill = min(prefill, self.token_budget)
            decoder = self.backend.decoder(self.generation_rows or MAX_ROWS, prefill, self.token_budget)  # type: ignore[attr-defined]
            todo = list(remaining)

            def done(k: int, text: str, todo: list[int] = todo) -> None:
                b, i = owners[todo[k]]
                finished.add(todo[k])
                results[b][i] = text
                left[b] -= 1
                if not left[b]:
                    on_batch_done(b, results[b])

            try:
                decoder.run([batches[b][i] for b, i in (owners[k] for k in todo)], done)
            except Exception as error:
                if not out_of_memory(error):
                    raise
                self.token_budget = halved_budget(decoder.in_flight, self.device)
                self.oom_halvings += 1
            remaining = [k for k in remaining if k not in finished]

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": "single",
            "tp": 1,
            "pp": 1,
            "dp": 1,
            "devices": [self.device],
            "oom_halvings": self.oom_halvings,
            "token_budgets": [self.token_budget],
            **self.backend.describe(),
        }

    def close(self) -> None:
        self.backend.close()
