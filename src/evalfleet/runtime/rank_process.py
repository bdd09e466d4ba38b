"""Rank side: what every worker process does around its model, whichever backend it holds.

A worker never outlives its driver, and a load that runs out of memory ends the process with
`LOAD_OOM_EXIT`, the code the driver reads as "retry with a larger layout" (transport.py).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from evalfleet.runtime.group import LOAD_OOM_EXIT

Loaded = TypeVar("Loaded")


def exit_with_parent() -> None:
    """End this process when its driver is gone, even a driver killed with SIGKILL."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="evalfleet-parent-watch", daemon=True).start()


def load_or_exit(load: Callable[[], Loaded]) -> Loaded:
    """`load()`, or exit with LOAD_OOM_EXIT when it runs out of memory (nothing is left to clean up)."""
    import torch

    try:
        return load()
    except torch.OutOfMemoryError as error:
        print(f"out of memory while loading: {error}", file=sys.stderr, flush=True)
        os._exit(LOAD_OOM_EXIT)
