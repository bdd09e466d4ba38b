"""The single-device engine: batch invariance, the request cache, and resuming after SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from evalfleet.engines.lightweight import LightweightEvaluationEngine
from evalfleet.types import EvaluationRequest
from samples import compare_samples, load_samples, metric_differences, metrics_of

TASKS = "demo_mc,demo_arith,demo_ppl"


def _request(model, out, **overrides) -> EvaluationRequest:
    fields = {
        "model": {"path": str(model), "dtype": "float32", "device": "cpu"},
        "tasks": {"names": TASKS, "limit": 12},
        "output_dir": str(out),
        "log_samples": True,
        "use_cache": False,
    }
    fields.update(overrides)
    return EvaluationRequest.model_validate(fields)


@pytest.fixture(scope="module")
def engine():
    return LightweightEvaluationEngine()


def test_batch_size_does_not_change_results(engine, tiny_model, tmp_path):
    runs = {}
    for batch_size in (1, 7, "auto"):
        out = tmp_path / f"bs-{batch_size}"
        result = engine.evaluate_sync(_request(tiny_model, out, batch_size=batch_size))
        runs[batch_size] = (load_samples(out), result.results)
    for batch_size in (7, "auto"):
        assert compare_samples(runs[1][0], runs[batch_size][0]) == []
        assert metric_differences(runs[1][1], runs[batch_size][1]) == []


def test_async_evaluate_reuses_the_loaded_model(engine, tiny_model, tmp_path):
    engine.evaluate_sync(_request(tiny_model, tmp_path / "a", tasks={"names": "demo_mc", "limit": 2}))
    backend = engine._loaded[1]
    result = asyncio.run(engine.evaluate(_request(tiny_model, tmp_path / "b", tasks={"names": "demo_mc", "limit": 2})))
    assert engine._loaded[1] is backend
    assert result.output_path == str(tmp_path / "b" / "results.json")
    assert engine.optimize_memory() > 0 and engine._loaded is None
    assert engine.optimize_memory() == 0


def test_second_run_computes_nothing_and_writes_the_same(engine, tiny_model, tmp_path):
    cache = tmp_path / "cache.sqlite"
    first = engine.evaluate_sync(_request(tiny_model, tmp_path / "one", use_cache=True, cache_path=str(cache)))
    second = engine.evaluate_sync(_request(tiny_model, tmp_path / "two", use_cache=True, cache_path=str(cache)))
    assert first.evalfleet["cache"]["computed"] > 0
    assert second.evalfleet["cache"]["computed"] == 0
    assert second.evalfleet["cache"]["hits"] == first.evalfleet["cache"]["misses"]
    assert metrics_of(first.results) == metrics_of(second.results)
    assert compare_samples(load_samples(tmp_path / "one"), load_samples(tmp_path / "two"), 0, 0) == []


def test_capabilities_describe_one_device(engine):
    capabilities = engine.get_capabilities()
    assert capabilities.strategies == ["single"] and "cpu" in capabilities.devices
    assert capabilities.max_model_gb > 0


def _cached_rows(path) -> int:
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_sigkill_mid_run_then_rerun_gives_identical_results(tiny_model, tmp_path):
    cache = tmp_path / "cache.sqlite"
    args = ["--model", str(tiny_model), "--tasks", TASKS, "--limit", "40", "--device", "cpu", "--dtype", "float32",
            "--batch-size", "1", "--log-samples", "--cache", str(cache)]
    command = [sys.executable, "-m", "evalfleet.cli", "run", *args]
    # One thread in every run: a run otherwise takes the cores free at its start, and float sums
    # over another thread count differ in the last bits, which the exact comparison below would see.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen([*command, "--output", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while _cached_rows(cache) < 20 and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    committed = _cached_rows(cache)
    assert committed >= 20

    resumed = subprocess.run([*command, "--output", str(tmp_path / "resumed")], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    section = json.loads((tmp_path / "resumed" / "results.json").read_text())["evalfleet"]["cache"]
    assert section["hits"] >= committed
    assert section["computed"] == section["misses"] > 0

    fresh = subprocess.run([*command, "--output", str(tmp_path / "fresh"), "--no-cache", "--report"], capture_output=True,
                           text=True, env=env)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert (tmp_path / "fresh" / "monitoring.png").stat().st_size > 1000
    assert compare_samples(load_samples(tmp_path / "fresh"), load_samples(tmp_path / "resumed"), 0, 0) == []
    resumed_doc = json.loads((tmp_path / "resumed" / "results.json").read_text())
    fresh_doc = json.loads((tmp_path / "fresh" / "results.json").read_text())
    assert metrics_of(resumed_doc) == metrics_of(fresh_doc)
