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

BatchCallback = Callable[[int, list[Any]], None]


def compute(backend: Backend, batch: Sequence[Item]) -> list[Any]:
    """One batch on one backend; a batch is all log-likelihood items or all generation items."""
    if isinstance(batch[0], GenerationItem):
        return list(backend.generate(list(batch)))
    return list(backend.loglikelihood(list(batch)))


def compute_splitting_on_oom(backend: Backend, batch: Sequence[Item]) -> tuple[list[Any], int]:
    """Compute `batch`, halving it for as long as the device runs out of memory.

    Returns the results and how many halvings were needed, so the caller can shrink
    its token budget for the batches still to come.
    """
    try:
        return compute(backend, batch), 0
    except OutOfMemory:
        if len(batch) == 1:
            raise
    middle = len(batch) // 2
    left, left_splits = compute_splitting_on_oom(backend, batch[:middle])
    right, right_splits = compute_splitting_on_oom(backend, batch[middle:])
    return left + right, 1 + max(left_splits, right_splits)


class BatchRunner(ABC):
    """Computes batches somewhere and reports each one as it finishes."""

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
    def samples(self) -> bool:
        """Whether the backend honours a generation request's sampling settings."""
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
        self.oom_splits = 0

    @property
    def max_length(self) -> int:
        return self.backend.max_length

    @property
    def shares_prefixes(self) -> bool:
        return bool(getattr(self.backend, "share_prefixes", False))

    @property
    def samples(self) -> bool:
        return self.backend.samples

    def run(self, batches: Sequence[Sequence[Item]], on_batch_done: BatchCallback) -> None:
        for index, batch in enumerate(batches):
            results, splits = compute_splitting_on_oom(self.backend, batch)
            self.oom_splits += splits
            on_batch_done(index, results)

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": "single",
            "tp": 1,
            "pp": 1,
            "dp": 1,
            "devices": [self.device],
            **self.backend.describe(),
        }

    def close(self) -> None:
        self.backend.close()
