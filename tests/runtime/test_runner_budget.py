"""The in-process runner's token budget: halved on out of memory, and kept halved for the next batches."""

from __future__ import annotations

import pytest

from evalfleet.runtime.backends.base import Backend, LoglikelihoodItem, OutOfMemory
from evalfleet.runtime.runner import InProcessRunner
from evalfleet.types import ResourceError


class SmallDevice(Backend):
    """Scores each item by its length; runs out of memory above `capacity` padded tokens."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.calls: list[int] = []

    @property
    def max_length(self) -> int:
        return 1000

    def loglikelihood(self, items):
        padded = len(items) * max(item.length for item in items)
        self.calls.append(padded)
        if padded > self.capacity:
            raise OutOfMemory(f"{padded} tokens")
        return [(-float(item.length), True) for item in items]

    def generate(self, items):
        raise NotImplementedError


def _batch(rows: int, length: int) -> list[LoglikelihoodItem]:
    return [LoglikelihoodItem((1,) * (length - 1), (2,)) for _ in range(rows)]


def test_out_of_memory_halves_the_budget_and_later_batches_start_at_the_halved_size():
    device = SmallDevice(capacity=40)
    runner = InProcessRunner(device, "cpu")
    done = {}
    runner.run([_batch(8, 10), _batch(8, 10), _batch(8, 10)], lambda i, r: done.setdefault(i, r))
    assert [len(done[i]) for i in range(3)] == [8, 8, 8] and done[0][0] == (-10.0, True)
    assert runner.token_budget == 40 and runner.oom_halvings == 1
    # 80 failed once; afterwards every call fits the halved budget, none fails again
    assert device.calls.count(80) == 1 and all(call <= 40 for call in device.calls[1:])
    assert runner.describe()["token_budgets"] == [40]


def test_one_request_that_does_not_fit_is_a_resource_error():
    runner = InProcessRunner(SmallDevice(capacity=5), "cpu")
    with pytest.raises(ResourceError, match="one request of 10 tokens does not fit in memory on cpu"):
        runner.run([_batch(2, 10)], lambda i, r: None)
