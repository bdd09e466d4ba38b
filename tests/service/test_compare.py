"""Comparison on runs with known answers: McNemar's exact p-values, the bootstrap, flips and refusals."""

from __future__ import annotations

import json
import math

import pytest
from clitools import run_main
from runs import write_run

from evalfleet.service.compare import compare_runs, load_results, mcnemar_exact, paired_bootstrap
from evalfleet.types import UsageError


def test_mcnemar_exact_matches_the_binomial_tail():
    # 10 samples right only in A, 2 only in B, 8 agree: p = 2 * P(X <= 2), X ~ Bin(12, 1/2).
    a = [1] * 10 + [0] * 2 + [1] * 4 + [0] * 4
    b = [0] * 10 + [1] * 2 + [1] * 4 + [0] * 4
    assert mcnemar_exact(a, b) == pytest.approx(2 * (1 + 12 + 66) / 2**12)
    assert mcnemar_exact(b, a) == mcnemar_exact(a, b)
    assert mcnemar_exact(a, a) == 1.0
    assert mcnemar_exact([1] * 3, [0] * 3) == pytest.approx(0.25)  # 2 * (1/2)^3


def test_paired_bootstrap_separates_a_real_difference_from_noise():
    mean = lambda values: sum(values) / len(values)  # noqa: E731  (not the fast path: exercises the general loop)
    shifted = [0.1 * i for i in range(40)]
    assert paired_bootstrap([x + 1.0 for x in shifted], shifted, mean, resamples=200) < 0.01
    noisy_a = [math.sin(i) for i in range(40)]
    noisy_b = [math.sin(i + 0.3) for i in range(40)]
    assert paired_bootstrap(noisy_a, noisy_b, mean, resamples=200) > 0.2
    assert paired_bootstrap(shifted, shifted, mean) == 1.0


def test_compare_runs_lists_values_test_and_flipped_samples(tmp_path):
    a = write_run(tmp_path / "a", "t", [1, 1, 1, 0, 1, 1, 0, 1])
    b = write_run(tmp_path / "b", "t", [0, 1, 1, 0, 0, 1, 1, 1])
    comparison = compare_runs(load_results(a), load_results(b))
    (task,) = comparison.tasks
    (metric,) = task.metrics
    assert (metric.metric, metric.a, metric.b, metric.difference) == ("acc", 0.75, 0.625, 0.125)
    assert metric.test == "mcnemar" and metric.p_value == pytest.approx(mcnemar_exact([1, 1, 0], [0, 0, 1]))
    assert [(f["doc_id"], f["a"], f["b"]) for f in metric.flipped] == [(0, 1, 0), (4, 1, 0), (6, 0, 1)]
    assert metric.flipped_count == 3


def test_non_binary_scores_use_the_tasks_own_aggregation(tmp_path):
    # Per-sample (log-likelihood, words) pairs: only lm-eval's weighted_perplexity aggregates them.
    good = [[-1.0 - 0.01 * i, 2] for i in range(30)]
    bad = [[-3.0 - 0.01 * i, 2] for i in range(30)]
    a = write_run(tmp_path / "a", "ppl", good, metric="word_perplexity", aggregation="weighted_perplexity")
    b = write_run(tmp_path / "b", "ppl", bad, metric="word_perplexity", aggregation="weighted_perplexity")
    (metric,) = compare_runs(load_results(a), load_results(b)).tasks[0].metrics
    assert metric.test == "paired bootstrap" and metric.p_value < 0.01 and metric.flipped == []
    words = sum(w for _, w in good)
    expected = math.exp(-sum(ll for ll, _ in good) / words) - math.exp(-sum(ll for ll, _ in bad) / words)
    assert metric.difference == pytest.approx(expected) and metric.difference < 0


def test_refuses_tasks_whose_hash_or_sample_count_differ(tmp_path):
    base = write_run(tmp_path / "a", "t", [1, 0, 1])
    other_prompts = write_run(tmp_path / "b", "t", [1, 0, 1], task_hash="h2")
    fewer = write_run(tmp_path / "c", "t", [1, 0])
    refused = compare_runs(load_results(base), load_results(other_prompts)).tasks[0]
    assert "task hashes differ" in refused.refused and refused.metrics == []
    assert "sample counts differ (3 vs 2)" in compare_runs(load_results(base), load_results(fewer)).tasks[0].refused


def test_without_samples_the_values_are_compared_and_the_test_is_explained(tmp_path):
    a = write_run(tmp_path / "a", "t", [1, 0, 1, 1], samples=False)
    b = write_run(tmp_path / "b", "t", [1, 0, 0, 1])
    (metric,) = compare_runs(load_results(a), load_results(b)).tasks[0].metrics
    assert metric.difference == 0.25 and metric.p_value is None and "--log-samples" in metric.note


def test_load_results_refuses_what_is_not_a_results_document(tmp_path):
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="not an lm-eval results document"):
        load_results(tmp_path / "x.json")
    with pytest.raises(UsageError, match="no results file"):
        load_results(tmp_path / "missing")


def test_compare_command_with_paths(tmp_path, capsys, monkeypatch):
    a = write_run(tmp_path / "a", "t", [1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    b = write_run(tmp_path / "b", "t", [0, 0, 0, 0, 0, 0, 1, 1, 0, 0])
    code, out, err = run_main(["compare", str(a), str(tmp_path / "b"), "--json"], capsys, monkeypatch)
    assert code == 0, err
    document = json.loads(out)
    metric = document["tasks"][0]["metrics"][0]
    assert metric["test"] == "mcnemar" and metric["p_value"] == pytest.approx(2 / 2**6)
    assert metric["flipped_count"] == 6

    code, out, err = run_main(["compare", str(a), str(b)], capsys, monkeypatch)
    assert code == 0 and "mcnemar" in out and "0.0312 *" in out and "flipped samples 0 (1->0)" in out

    write_run(tmp_path / "c", "t", [1] * 10, task_hash="other")
    code, out, err = run_main(["compare", str(a), str(tmp_path / "c")], capsys, monkeypatch)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("error: nothing to compare: t: the task hashes differ")

    code, out, err = run_main(["compare", str(a), "nosuchjob"], capsys, monkeypatch)
    assert code == 2 and "nosuchjob is neither a results file nor a job id" in err and "Traceback" not in err


def _with_settings(path, **settings):
    document = json.loads(path.read_text())
    base = {"lm_eval_version": "0.4.13", "chat_template_sha": None, "fewshot_as_multiturn": False, "gen_kwargs": {},
            "seeds": {"random": 0, "numpy": 1234, "torch": 1234, "fewshot": 1234}, "model_args": {"dtype": "float32"}}
    document["evalfleet"]["settings"] = {**base, **settings}
    path.write_text(json.dumps(document))
    return path


def test_settings_that_change_scores_are_named_when_they_differ(tmp_path, capsys, monkeypatch):
    a = _with_settings(write_run(tmp_path / "a", "t", [1, 0, 1, 1]))
    b = _with_settings(write_run(tmp_path / "b", "t", [1, 1, 1, 0]), chat_template_sha="abc", fewshot_as_multiturn=True,
                       seeds={"random": 0, "numpy": 1234, "torch": 7, "fewshot": 1234}, gen_kwargs=None)
    differences = compare_runs(load_results(a), load_results(b)).settings
    assert [(d.setting, d.a, d.b) for d in differences] == [
        ("chat_template_sha", None, "abc"), ("fewshot_as_multiturn", False, True), ("seeds.torch", 1234, 7)]
    code, out, _ = run_main(["compare", str(a), str(b)], capsys, monkeypatch)
    assert code == 0 and "settings differ seeds.torch: A 1234, B 7" in out
    # lm-eval's own results.json (its top-level fields and `config`) is read the same way
    lm_eval = json.loads(a.read_text())
    del lm_eval["evalfleet"]
    lm_eval.update(lm_eval_version="0.4.13", chat_template_sha=None, fewshot_as_multiturn=None,
                   config={"gen_kwargs": None, "random_seed": 0, "numpy_seed": 1234, "torch_seed": 1234, "fewshot_seed": 1234})
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "results.json").write_text(json.dumps(lm_eval))
    assert compare_runs(load_results(a), load_results(tmp_path / "lm")).settings == []
