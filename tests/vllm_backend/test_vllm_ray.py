"""vLLM on Ray: `run --ray --backend vllm` on a real `ray.cluster_utils.Cluster` with real CPU vLLM.

A head and two nodes of two declared GPUs each. The driver (`evalfleet run`, this environment) has
Ray and no vLLM; each replica is a Ray actor that runs its vLLM engine under the vLLM environment's
Python (`EVALFLEET_VLLM_PYTHON`). A dp=2 job, one replica per node, with a node SIGKILLed mid-run,
finishes on the other node and equals lm-eval's `hf` backend within vLLM's tolerance; without vLLM
on the ranks, the job is refused in one sentence. At most two vLLM engines live at once (one per
replica).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import psutil
import pytest
from clitools import evalfleet_command
from samples import compare_samples, lm_eval_hf, load_samples, metric_differences
from raycluster import cached_rows, local_cluster, remove_node_of
from vllm_support import VLLM_PYTHON, require_vllm_env

pytestmark = pytest.mark.slow

TASKS = ["demo_mc", "demo_arith", "demo_ppl"]
LIMIT = 12
ABS_TOL, REL_TOL = 1e-3, 1e-4  # vLLM's float32 kernels against transformers' (test_vllm_backend.py)


def _replica_actors() -> list[psutil.Process]:
    lines = ((p, " ".join(p.info["cmdline"] or [])) for p in psutil.process_iter(["cmdline"]))
    return [p for p, line in lines if line.startswith("ray::VllmReplica")]


@pytest.fixture(scope="module")
def cluster():
    """Two nodes of two declared GPUs: a replica on each, and both on the one left after a node loss."""
    with local_cluster(2, 2) as cluster:
        yield cluster
    shutil.rmtree(cluster.tmpdir, ignore_errors=True)


def _run_args(cluster, model, out, cache, *extra: str) -> list[str]:
    return [*evalfleet_command(), "run", "--ray", cluster.address, "--backend", "vllm", "--dtype", "float32",
            "--model", str(model), "--tasks", ",".join(TASKS), "--limit", str(LIMIT), "--dp", "2", "--log-samples",
            "--max-batch-tokens", "300", "--cache", str(cache), "--output", str(out), *extra]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COV_CORE", "PYTEST"))}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", EVALFLEET_VLLM_PYTHON=str(VLLM_PYTHON), **extra)
    return env


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _replica_nodes() -> list[int]:
    """The raylet (node) of each live vLLM replica actor."""
    return sorted(actor.ppid() for actor in _replica_actors())


def test_a_dp2_vllm_job_on_ray_equals_lm_eval_through_a_node_lost_mid_job(cluster, vllm_model, tmp_path):
    """One run for both: replicas start one per node; a node is SIGKILLed once results are cached; the
    replica on the other node finishes the job in the same attempt (no retry, no restart), taking the
    lost one's batch; samples and metrics equal lm-eval's `hf` within vLLM's tolerance (and the backend
    really is vLLM, never transformers)."""
    require_vllm_env()
    reference = lm_eval_hf(vllm_model, TASKS, LIMIT)
    cache, out = tmp_path / "cache.sqlite", tmp_path / "out"
    process = subprocess.Popen(_run_args(cluster, vllm_model, out, cache, "--batch-size", "1"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_env())
    try:
        wait_for(lambda: process.poll() is not None or cached_rows(cache) >= 2, 900, "the run to compute")
        assert process.poll() is None, process.communicate()
        nodes = _replica_nodes()
        assert len(nodes) == 2 and len(set(nodes)) == 2, "one replica per node before the loss"
        remove_node_of(cluster, _replica_actors()[0])
        _, stderr = process.communicate(timeout=1200)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr[-4000:]
    assert [line for line in stderr.splitlines() if line.startswith("attempt ")] == [], stderr[-4000:]
    document = json.loads((out / "results.json").read_text())
    section, layout = document["evalfleet"], document["evalfleet"]["layout"]
    assert section["engine"] == "ray" and section["backend"]["name"] == "vllm" and section["backend"]["version"]
    assert layout["parallel_path"] == "vllm" and (layout["tp"], layout["pp"], layout["dp"]) == (1, 1, 2)
    assert layout["vllm"]["dtype"] == "float32" and layout["vllm"]["kv_cache_memory_bytes"] > 0
    (survivor,) = cluster.gpu_nodes
    assert [node for (node,) in layout["placement"]] == [survivor.node_id]
    assert [change["change"] for change in layout["replica_changes"]] == ["lost"]
    assert survivor.node_id not in layout["replica_changes"][0]["nodes"] and layout["replicas_at_end"] == 1
    assert section["calibration"]["skipped"]  # a run whose replicas changed measures no one layout
    ours = load_samples(out)
    assert set(ours) == set(TASKS)
    assert compare_samples(reference["samples"], ours, ABS_TOL, REL_TOL) == []
    assert metric_differences(reference, document, rel_tol=1e-4) == []
    wait_for(lambda: not _replica_actors(), 60, "the vLLM replica actors to exit")


def test_a_vllm_replica_on_ray_gets_its_generation_batches_merged(cluster, vllm_model, tmp_path):
    """Twelve generation batches of one row each go to the replica as two calls of six (at least two calls
    a replica; vLLM schedules the rows of a call itself), each waited for as long as its six batches
    together, and the texts equal lm-eval's `hf`."""
    require_vllm_env()
    reference = lm_eval_hf(vllm_model, ["demo_arith"], LIMIT)
    out = tmp_path / "out"
    args = [*evalfleet_command(), "run", "--ray", cluster.address, "--backend", "vllm", "--dtype", "float32",
            "--model", str(vllm_model), "--tasks", "demo_arith", "--limit", str(LIMIT), "--dp", "1", "--batch-size", "1",
            "--log-samples", "--no-cache", "--output", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, env=_env())
    assert done.returncode == 0, done.stderr[-4000:]
    layout = json.loads((out / "results.json").read_text())["evalfleet"]["layout"]
    assert layout["parallel_path"] == "vllm" and layout["dp"] == 1
    assert layout["calls_per_replica"] == [2], layout
    assert compare_samples(reference["samples"], load_samples(out), ABS_TOL, REL_TOL) == []
    wait_for(lambda: not _replica_actors(), 60, "the vLLM replica actor to exit")


def test_vllm_without_vllm_on_the_ranks_is_refused_in_one_sentence(cluster, vllm_model, tmp_path):
    """The ranks' Python has no vLLM and none is named: refused before anything loads, never run with transformers."""
    env = _env()
    env.pop("EVALFLEET_VLLM_PYTHON")
    done = subprocess.run(_run_args(cluster, vllm_model, tmp_path / "out", tmp_path / "cache.sqlite"),
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode != 0 and not (tmp_path / "out").exists()
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: vLLM is not installed in the Python environment of the Ray ranks on node "), \
        done.stderr[-2000:]
    assert "EVALFLEET_VLLM_PYTHON" in lines[-1] and "Traceback" not in done.stderr


def test_a_vllm_replica_placed_over_two_nodes_is_refused():
    from evalfleet.runtime.group import GroupSpec
    from evalfleet.runtime.ray_ranks import RayGroupRunner
    from evalfleet.types import EvalfleetError

    runner = RayGroupRunner(GroupSpec("model", tp=2, backend="vllm"), 1, ["node-a", "node-b"])
    with pytest.raises(EvalfleetError, match="a vLLM replica runs on one node, and replica 0 was placed on several"):
        runner.start()
