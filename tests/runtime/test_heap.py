"""A process whose model computes on the CPU keeps the blocks it frees for its next batches
(runtime/heap.py): pages are faulted in once, not at every new activation size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# In a fresh interpreter (malloc's thresholds are the process's): activations of growing sizes,
# 2 to 30 MiB, each written (so its pages are faulted in) and freed, as a batch's layers do, three
# passes over the same sizes; the pages each pass faulted in.
GROWING = """
import json, resource, sys
import torch
from evalfleet.runtime import heap

kept = heap.keep_freed_blocks() if sys.argv[1] == "keep" else None
if sys.argv[1] == "load":
    from evalfleet.runtime.backends.hf import HFBackend
    HFBackend.load(sys.argv[2], dtype="float32", device="cpu")
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for mib in range(2, 32, 2):
        block = torch.ones(mib * 2**18)  # 4-byte floats: `mib` MiB, every page written
        del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""
PAGES_PER_MIB = 2**20 // os.sysconf("SC_PAGE_SIZE")


def _faults(how: str, *args: str, **env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run([sys.executable, "-c", GROWING, how, *args], capture_output=True, text=True, timeout=300,
                         check=True, env=environment)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_blocks_of_new_sizes_reuse_freed_pages_once_kept(tiny_model):
    plain, kept, loaded = _faults("plain"), _faults("keep"), _faults("load", str(tiny_model))
    assert kept["kept"] is True
    # without: every block of the first pass gets pages of its own and gives them back (240 MiB
    # written, all faulted); the second pass, under the thresholds malloc raised on the way, faults
    # the heap in again, at least as far as its largest block (30 MiB)
    assert plain["faults"][0] > 200 * PAGES_PER_MIB and plain["faults"][1] > 24 * PAGES_PER_MIB, plain
    # kept: the pages faulted in the first pass stay with the process, so the later passes over the
    # same sizes fault (almost) nothing; as after a CPU load. Not asserted: how much of the first
    # pass the heap saves, which depends on where Python's small objects fall between the blocks
    # (75% down to 40% of the pages, seen here)
    for run in (kept, loaded):
        assert sum(run["faults"][1:]) < min(16 * PAGES_PER_MIB, plain["faults"][1] / 3), (run, plain)


def test_thresholds_the_user_set_are_left_alone():
    assert _faults("keep", MALLOC_TRIM_THRESHOLD_="0")["kept"] is False
