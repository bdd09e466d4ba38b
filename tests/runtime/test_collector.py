"""A model loads with Python's garbage collector paused, its code set aside once per process, and
the model itself stays collectable (runtime/collector.py)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest

from evalfleet.runtime.backends.hf import HFBackend
from evalfleet.types import EvalfleetError

# In a fresh interpreter, so that this load is the process's first: collections made frequent
# (a load the collector ran through would meet dozens), each one seen by a callback.
FIRST_LOADS = """
import gc, json, sys, weakref
from evalfleet.runtime.backends.hf import HFBackend

gc.set_threshold(100, 2, 2)
seen = []
gc.callbacks.append(lambda phase, info: seen.append(info["generation"]) if phase == "start" else None)
first = HFBackend.load(sys.argv[1], dtype="float32", device="cpu")
during_first, frozen = list(seen), gc.get_freeze_count()
model = weakref.ref(first.model)
first.model.__dict__["itself"] = first.model  # a reference cycle: only the collector can free it
del first
gc.collect()
seen.clear()
second = HFBackend.load(sys.argv[1], dtype="float32", device="cpu")
print(json.dumps({
    "during_first": during_first, "frozen": frozen, "during_second": seen,
    "frozen_after_second": gc.get_freeze_count(), "enabled": gc.isenabled(),
    "first_model_freed": model() is None, "second_generates": second.model is not None,
}))
"""


def test_a_process_first_load_pauses_the_collector_and_freezes_only_the_code(tiny_model):
    out = subprocess.run([sys.executable, "-c", FIRST_LOADS, str(tiny_model)], capture_output=True, text=True,
                         timeout=300, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    # the first load: the young collection asked for before the freeze, then at most the one the
    # collector makes as it comes back; never the whole heap
    during = report["during_first"]
    assert during[0] == 1 and len(during) <= 2 and 2 not in during
    assert report["frozen"] > 10_000  # the model's imported code
    # the model was never frozen: dropped, it is freed though caught in a reference cycle
    assert report["first_model_freed"]
    # a later load only pauses: at most the collection as the collector comes back, nothing more frozen
    assert report["during_second"] in ([], [0])
    assert report["frozen_after_second"] <= report["frozen"]  # frozen objects may still die of their references
    assert report["enabled"] and report["second_generates"]


def test_the_collector_runs_again_after_a_load_that_failed(tmp_path, tiny_model):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_model.iterdir():
        if item.is_file():
            (broken / item.name).write_bytes(item.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # cut short, as a copy that stopped
    assert gc.isenabled()
    with pytest.raises(EvalfleetError, match="could not load model"):
        HFBackend.load(str(broken), dtype="float32", device="cpu")
    assert gc.isenabled()
