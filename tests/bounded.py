"""A call that a test bounds in time: an unbounded wait fails the test instead of hanging it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def bounded(call: Callable[[], Any], timeout: float, what: str) -> Any:
    """`call()`'s result or the exception it raised; the test fails, rather than hangs, if it still
    waits after `timeout` seconds."""
    outcome: list = []

    def target() -> None:
        try:
            outcome.append(call())
        except BaseException as error:  # handed to the test
            outcome.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, f"still waiting after {timeout:.0f}s for {what}: an unbounded wait"
    return outcome[0]
