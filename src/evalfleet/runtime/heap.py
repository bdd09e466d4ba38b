"""The C heap of a process that computes on the CPU: blocks it frees are kept for the next batch.

glibc's malloc gives each block larger than its mmap threshold (128 KiB in a fresh process,
raised as larger blocks are freed, at most 32 MiB) pages of its own from the kernel, and hands
them back when the block is freed; the top of the heap is handed back too once more than a trim
threshold of it is free. A forward pass on the CPU allocates and frees megabytes of activations
at every layer, of ever new sizes as a batch's rows and columns change, so a fresh process got
each of them in new pages, which the kernel faults in and zeroes one 4 KiB page at a time.
Measured on bench_chain's continuous decode of its captured requests, in a fresh process (three
alternations): its first prefill faulted 86,000-93,000 pages and took 0.29-0.30 s; with the heap
kept, 38,000-42,000 pages and 0.22-0.25 s.

So a model loaded for the CPU sets both thresholds, once per process (`keep_freed_blocks`):
blocks up to 32 MiB come from the heap and are reused, and up to 512 MiB of freed heap stays
with the process. Thresholds the user set in the environment are left as they are, and outside
glibc nothing changes.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # mallopt's parameters (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest (half its 64 MiB heap size on 64-bit machines)
TRIM_THRESHOLD = 512 * 2**20
_kept = False


def keep_freed_blocks() -> bool:
    """Whether this process's malloc now keeps freed blocks up to MMAP_THRESHOLD in its heap (set
    here or earlier); False where the C library has no mallopt or the user set the thresholds."""
    global _kept
    if _kept:
        return True
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _kept = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _kept
