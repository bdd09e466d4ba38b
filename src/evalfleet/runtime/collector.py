"""Python's cyclic garbage collector while a model loads: paused, and the imported code set aside.

Loading a model imports its code: a few hundred thousand objects (modules, classes, functions)
that live as long as the process. Their allocation keeps triggering the collector, and each
time it reaches its oldest generation it walks the whole heap. Measured: on the GSM8K-shaped
benchmark (`benchmarks/vs_lmeval.py --cases bench_chain`) two full collections took 0.28 s of a
1.5 s start-up, and one full collection of the loaded process takes 0.18 s; a vLLM engine of the
demo model on the CPU loaded in 5.3 s, 1.7 s of it six full collections, and in 3.3 s as here.

So a load runs with the collector paused (`paused`), and the process's first load freezes what
exists once the model's code is imported and before the model is built (`keep_imported`,
`gc.freeze`): later collections, vLLM's own among them, walk only what was made after it. The
model itself is never frozen: a frozen object caught in a reference cycle is never freed, nor is
what it references, and a model's cycles are its code's business. Later loads only pause: by
then the process may hold a dropped model that the collector has not reached yet.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_kept = False  # whether this process froze its imported code already


@contextmanager
def paused() -> Iterator[None]:
    """No collection runs on its own within the block (one asked for still does)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def keep_imported() -> None:
    """Freeze what the process holds now, the first time only: call it with a model's code
    imported and the model not yet built."""
    global _kept
    if not _kept:
        # first the young garbage, which the imports just made: a caught exception's traceback
        # holds the frames beneath it, this load's among them, and a frame that outlives its call
        # keeps its locals (the model, once built); frozen, it would never be freed
        gc.collect(1)
        gc.freeze()
        _kept = True
