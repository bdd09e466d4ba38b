"""One calibration run makes the next estimate measured, and close to what the run takes.

The demo model and tasks (log-likelihood and generation), on one process and on a
micro-batched pp=2 group: before any run the estimate is the cost model's; the run keeps its
speeds; the next estimate uses them, and its predicted compute time is within a generous band
of the measured one (benchmarks/calibration.py reports the figures on a larger model).
"""

from __future__ import annotations

import os

import pytest

from evalfleet.engines.run import evaluate_request
from evalfleet.orchestrator.demand import estimate_for
from evalfleet.planning import Inventory
from evalfleet.types import EvaluationRequest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("hints", [{}, {"strategy": "pp", "pp": 2}], ids=["single", "pp=2"])
def test_after_one_run_the_estimate_is_measured_and_close(hints, tmp_path, monkeypatch):
    # the single process takes the cores free at its start; fixing them keeps both runs and
    # their estimates on one key however busy the machine was a moment before
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    request = EvaluationRequest.model_validate({
        "model": {"path": "demo", "dtype": "float32", "device": "cpu"},
        "tasks": {"names": ["demo_mc", "demo_arith"]}, "use_cache": False, **hints,
    })
    before, size = estimate_for(request, Inventory.cpu())
    assert before["source"] == "modeled"
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // 2) * 2 if hints else 2  # as the engines give them
    layout = "tp=1 pp=2 dp=1" if hints else "tp=1 pp=1 dp=1"
    assert before["key"].endswith(f"hf float32, {layout} on cpu x{threads}"), before["key"]

    first = evaluate_request(request).evalfleet
    assert first["calibration"]["kept"] == ["loglikelihood", "generation"]
    # the counted work per kind is the work the run computed
    assert {kind: f["tokens"] for kind, f in first["timing"]["by_kind"].items()} == size["work_tokens_by_kind"]

    after, _ = estimate_for(request, Inventory.cpu())
    assert after["source"] == "measured"
    assert all(kind["runs"] == 1 for kind in after["by_kind"].values())
    second = evaluate_request(request).evalfleet
    measured = sum(kind["seconds"] for kind in second["timing"]["by_kind"].values())
    assert 0.4 <= after["seconds"] / measured <= 2.5, (after, second["timing"]["by_kind"])
