"""Measured speeds: what is kept, under which key, and how estimates name their source."""

from __future__ import annotations

import pytest

from evalfleet.planning.calibration import (
    RECENT_RUNS,
    Calibration,
    CalibrationKey,
    KindEstimate,
    gpu_hardware,
    job_estimate,
    kind_estimates,
    record_run,
)

KEY = CalibrationKey("LlamaForCausalLM h128 l4 a4/2 f384 v512", "hf", "float32", 1, 2, 1, "cpu x2")


def test_a_speed_is_the_recent_runs_tokens_over_their_seconds(tmp_path):
    calibration = Calibration(tmp_path / "c.sqlite")
    assert calibration.measured(KEY, "loglikelihood") is None  # no file yet
    assert calibration.record(KEY, "loglikelihood", 1000, 1.0)
    assert calibration.record(KEY, "loglikelihood", 3000, 1.0)
    assert not calibration.record(KEY, "loglikelihood", 10, 0.001)  # too short to measure
    found = calibration.measured(KEY, "loglikelihood")
    assert (found.tokens_per_s, found.runs, found.tokens) == (2000.0, 2, 4000)
    assert calibration.measured(KEY, "generation") is None
    other_layout = CalibrationKey(**{**KEY.__dict__, "pp": 1})
    assert calibration.measured(other_layout, "loglikelihood") is None
    for _ in range(RECENT_RUNS):
        calibration.record(KEY, "loglikelihood", 500, 1.0)
    assert calibration.measured(KEY, "loglikelihood").tokens_per_s == 500.0  # older runs age out
    with pytest.raises(ValueError, match="unknown kind"):
        calibration.record(KEY, "rolling", 1, 1.0)


def test_estimates_use_measured_speeds_where_there_are_some_and_say_so(tmp_path):
    calibration = Calibration(tmp_path / "c.sqlite")
    modeled = {"loglikelihood": 1000.0, "generation": 100.0}
    kinds = kind_estimates(KEY, modeled, calibration)
    estimate = job_estimate({"loglikelihood": 2000, "generation": 100}, kinds)
    assert (estimate["source"], estimate["seconds"], estimate["modeled_seconds"]) == ("modeled", 3.0, 3.0)

    calibration.record(KEY, "loglikelihood", 4000, 1.0)
    kinds = kind_estimates(KEY, modeled, calibration)
    assert kinds["loglikelihood"].to_dict()["measured_over_modeled"] == 4.0
    estimate = job_estimate({"loglikelihood": 2000, "generation": 100}, kinds)
    assert (estimate["source"], estimate["seconds"], estimate["modeled_seconds"]) == ("partly measured", 1.5, 3.0)
    # a job without generation work is measured throughout
    assert job_estimate({"loglikelihood": 2000, "generation": 0}, kinds)["source"] == "measured"


def test_a_run_is_kept_under_its_shape_layout_and_hardware(tmp_path):
    from types import SimpleNamespace

    profile = SimpleNamespace(architecture="LlamaForCausalLM", hidden_size=128, num_layers=4, num_heads=4,
                              num_kv_heads=2, intermediate_size=384, vocab_size=512)
    section = {
        "backend": {"name": "hf"}, "model": {"dtype": "float32", "path": "/m"},
        "layout": {"tp": 1, "pp": 2, "dp": 1, "threads_per_rank": 1},
        "hardware": {"cpu_threads": 2},
        "timing": {"by_kind": {"loglikelihood": {"tokens": 5000, "seconds": 2.0},
                               "generation": {"tokens": 50, "seconds": 0.01}}},
    }
    calibration = Calibration(tmp_path / "c.sqlite")
    assert record_run(section, profile, calibration) == ["loglikelihood"]
    assert calibration.measured(KEY, "loglikelihood").tokens_per_s == 2500.0
    assert record_run({**section, "hardware": {}}, profile, calibration) == []  # unknown hardware: nothing kept


def test_gpus_are_named_as_the_planner_names_them():
    assert gpu_hardware("NVIDIA H100 80GB HBM3") == "H100"
    assert gpu_hardware("NVIDIA A100-SXM4-80GB") == "A100-80GB"
    assert gpu_hardware("Some Future GPU") == "Some Future GPU"


def test_a_measured_kind_reports_the_models_error():
    figures = KindEstimate("loglikelihood", "measured", 500.0, 1000.0, 3).to_dict()
    assert figures == {"source": "measured", "tokens_per_s": 500.0, "modeled_tokens_per_s": 1000.0, "runs": 3,
                       "measured_over_modeled": 0.5}
    assert "runs" not in KindEstimate("generation", "modeled", 10.0, 10.0).to_dict()


def test_plan_shows_the_measured_speed_beside_the_models(tmp_path, monkeypatch):
    from evalfleet.planning import Inventory, plan, profile_model
    from evalfleet.planning.calibration import describe_speed, plan_speeds
    from evalfleet.types import DEMO_MODEL_DIR

    monkeypatch.setenv("EVALFLEET_CALIBRATION", str(tmp_path / "c.sqlite"))
    inventory = Inventory.cpu(total_gb=16, free_gb=16)
    result = plan(profile_model(str(DEMO_MODEL_DIR)), inventory, dtype="float32")
    speeds = plan_speeds(result, inventory)
    assert {figures["source"] for figures in speeds["by_kind"].values()} == {"modeled"}
    assert describe_speed("loglikelihood", speeds["by_kind"]["loglikelihood"]).endswith("tokens/s (modeled)")

    key = speeds["key"]
    assert key.startswith("LlamaForCausalLM h128 l4") and ", hf float32, tp=1 pp=1 dp=1 on cpu x" in key
    shape, rest = key.split(", hf float32, ")
    hardware = rest.split(" on ")[1]
    Calibration().record(CalibrationKey(shape, "hf", "float32", 1, 1, 1, hardware), "loglikelihood", 9000, 1.0)
    figures = plan_speeds(result, inventory)["by_kind"]["loglikelihood"]
    assert (figures["source"], figures["tokens_per_s"], figures["runs"]) == ("measured", 9000.0, 1)
    assert describe_speed("loglikelihood", figures).startswith("log-likelihood ~9,000 tokens/s (measured, 1 run; the model says")
