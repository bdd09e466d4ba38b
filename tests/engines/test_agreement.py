"""evalfleet gives lm-eval's own `hf` backend results on a model neither of them was written for."""

from __future__ import annotations

import json

import pytest

from clitools import run_subprocess
from samples import compare_samples, lm_eval_hf, load_samples, metric_differences, metrics_of

TASKS = ["demo_mc", "demo_arith", "demo_ppl"]
LIMIT = 30


@pytest.fixture(scope="module")
def lm_eval_reference(tiny_model, tmp_path_factory):
    """lm-eval's HFLM on the tiny GPT-NeoX model, batch size 3 so batches are padded."""
    return lm_eval_hf(tiny_model, TASKS, LIMIT, batch_size=3)


@pytest.fixture(scope="module")
def evalfleet_run(tiny_model, tmp_path_factory):
    """The real command, in its own process, as a user runs it."""
    out = tmp_path_factory.mktemp("agreement")
    done = run_subprocess(
        ["run", "--model", str(tiny_model), "--tasks", ",".join(TASKS), "--limit", str(LIMIT),
         "--log-samples", "--output", str(out), "--device", "cpu", "--dtype", "float32", "--max-batch-tokens", "700"],
        env={"EVALFLEET_CACHE": str(out / "cache.sqlite")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_per_sample_results_equal_lm_eval_hf(lm_eval_reference, evalfleet_run):
    out, _ = evalfleet_run
    ours = load_samples(out)
    assert set(ours) == set(TASKS)
    reference = {task: json.loads(json.dumps(rows, default=str)) for task, rows in lm_eval_reference["samples"].items()}
    assert compare_samples(reference, ours) == []


def test_every_metric_equals_lm_eval_hf(lm_eval_reference, evalfleet_run):
    out, _ = evalfleet_run
    document = json.loads((out / "results.json").read_text())
    assert metric_differences(lm_eval_reference, document) == []
    assert document["n-shot"] == lm_eval_reference["n-shot"]


def test_results_document_has_evalfleet_section(evalfleet_run):
    out, done = evalfleet_run
    section = json.loads((out / "results.json").read_text())["evalfleet"]
    assert section["engine"] == "lightweight"
    assert section["layout"]["strategy"] == "single" and section["layout"]["devices"] == ["cpu"]
    timing = section["timing"]
    assert timing["requests"] == timing["requests_by_type"]["loglikelihood"] + LIMIT * 2
    assert timing["tokens"] > 0 and timing["requests_per_s"] > 0
    assert section["cache"]["computed"] == section["cache"]["misses"] > 0
    assert "demo_mc" in done.stdout and "acc" in done.stdout  # the results table
    monitoring = section["monitoring"]
    assert monitoring["samples"] >= 1 and monitoring["peak_memory"]["host_rss_bytes"] > 50e6
    assert monitoring["nvml"].startswith("unavailable") and monitoring["gpus"] == {}


def test_comparison_catches_a_changed_number(evalfleet_run):
    out, _ = evalfleet_run
    ours = load_samples(out)
    tampered = json.loads(json.dumps(ours))
    first = tampered["demo_ppl"][0]
    first["resps"][0][0] += 0.05
    tampered["demo_arith"][0]["resps"][0][0] += "x"
    problems = compare_samples(ours, tampered)
    assert len(problems) == 2


def test_metric_comparison_catches_a_flipped_answer(lm_eval_reference):
    from copy import deepcopy

    changed = deepcopy(lm_eval_reference)
    changed["results"]["demo_mc"]["acc,none"] += 1 / LIMIT
    changed["results"]["demo_ppl"]["word_perplexity,none"] *= 1.00001
    assert len(metric_differences(lm_eval_reference, changed)) == 2
