"""What a backend computes: one padded batch of token-level requests, nothing else.

Tokenization, caching, batching and ordering live in the runtime above; a backend only turns
a batch of token ids into numbers (or text, greedy or sampled). The same interface serves one process
on one device and each rank of a tensor/pipeline-parallel worker group, and the vLLM backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoglikelihoodItem:
    """Score `continuation` after `context`. Both are token ids; `context` is never empty."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.context) + len(self.continuation)


@dataclass(frozen=True)
class GenerationItem:
    """Generate after `context` until a stop string or `max_new_tokens`.

    Greedy unless `sampling` holds lm-eval's sampling settings as sorted (name, value) pairs
    (temperature, top_p, top_k, and always the seed of this one draw).
    """

    context: tuple[int, ...]
    until: tuple[str, ...]
    max_new_tokens: int
    sampling: tuple[tuple[str, float | int], ...] = ()

    @property
    def length(self) -> int:
        return len(self.context) + self.max_new_tokens


Item = LoglikelihoodItem | GenerationItem


class OutOfMemory(RuntimeError):
    """A batch did not fit the device; the caller retries it in smaller pieces."""


class Backend(ABC):
    """Computes batches on a model that is already loaded."""

    name: str = "backend"
    # A rank's merged generation calls (runner.streamed): the token budget their out-of-memory
    # halvings left, kept for the backend's later calls, and how many halvings there were.
    stream_budget: int | None = None
    stream_halvings: int = 0

    @property
    @abstractmethod
    def max_length(self) -> int:
        """Longest sequence (context + continuation) the model takes."""

    @abstractmethod
    def loglikelihood(self, items: list[LoglikelihoodItem]) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, whether the continuation is the greedy one) per item."""

    @abstractmethod
    def generate(self, items: list[GenerationItem]) -> list[str]:
        """The continuation of each item (greedy unless it asks to sample, then drawn with its own seed
        whatever the batch), cut at its first stop string."""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name}

    def close(self) -> None:
        """Free the model. The default keeps nothing to free."""
