"""How many threads torch gets on the CPU: the cores this process may use, less the busy ones.

torch starts one thread per physical core. When other processes keep some of those cores
busy, its threads wait on each other at every operation and a small model runs an order of
magnitude slower than on one thread (measured here: 8 greedy steps of a 4-layer model took
7.4 s on two contended threads, 0.6 s on one). OMP_NUM_THREADS, when set, wins.
"""

from __future__ import annotations

import math
import os


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def choose_threads(cores: int | None = None, load: float | None = None) -> int:
    """Free cores: `cores` less the recent run-queue beyond one (which may be this process itself)."""
    cores = usable_cores() if cores is None else cores
    load = os.getloadavg()[0] if load is None and hasattr(os, "getloadavg") else (load or 0.0)
    busy = math.floor(max(0.0, load - 1.0))
    return max(1, min(cores, cores - busy))


def run_threads() -> int:
    """The threads a run started now gets: OMP_NUM_THREADS when set, else `choose_threads()`."""
    fixed = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, int(fixed)) if fixed.isdigit() else choose_threads()


def set_torch_threads() -> int:
    """Apply `run_threads()` to torch; returns the count in use."""
    import torch

    torch.set_num_threads(run_threads())
    return torch.get_num_threads()
