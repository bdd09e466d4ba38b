"""What a user sees from `evalfleet run`: our progress and results, no third-party noise, and
one sentence when a built-in task's dataset cannot be downloaded."""

from __future__ import annotations

import pytest

from clitools import run_subprocess

pytestmark = pytest.mark.slow

NOISE = (
    "Custom kwargs can be passed to `--metadata`",  # lm-eval, for tasks with a custom_dataset hook
    "not a git repository",  # git, run by lm-eval outside a checkout
    "Token indices sequence length is longer than the specified maximum",  # transformers, rolling windows
)


def test_the_demo_prints_no_third_party_noise(tmp_path):
    """`make demo`'s command, run outside any git checkout, captured whole."""
    done = run_subprocess(["run", "--model", "demo", "--tasks", "demo_mc,demo_arith,demo_ppl",
                           "--output", str(tmp_path / "out")], cwd=tmp_path, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "demo_ppl" in output and "word_perplexity" in output  # the results table is there
    for text in NOISE:
        assert text not in output, f"{text!r} in:\n{output}"


def test_a_builtin_task_without_network_is_one_sentence(tmp_path):
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    done = run_subprocess(["run", "--model", "demo", "--tasks", "arc_easy", "--limit", "2",
                           "--output", str(tmp_path / "out")], env=env, timeout=600)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr
    assert "the dataset 'allenai/ai2_arc' of task arc_easy cannot be downloaded" in done.stderr
    assert "HF_DATASETS_CACHE" in done.stderr and "dataset_path" in done.stderr
