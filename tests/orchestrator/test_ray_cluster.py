"""Real Ray: a head and three nodes of two declared GPUs each (`ray.cluster_utils.Cluster`), on the CPU.

`evalfleet run --ray` with pipeline stages and replicas spread over the nodes, `evalfleet scheduler
--ray` with three jobs side by side, a node SIGKILLed mid-job (`raycluster.lose_node`),
and a scheduler SIGKILLed while its job runs. Every result equals a single-process run; no Ray
process or actor outlives the module. Then, with this process as a driver of the cluster: a node
lost in the round that places another job, and the bounds on a placement group and on a batch.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import psutil
import pytest
from bounded import bounded
from faultenv import fault_env
from fleet import fleet_in, wait_for
from raycluster import cached_rows, local_cluster, lose_node, remove_node_of
from samples import compare_samples, load_samples
from tinymodels import build_tiny_model

from evalfleet.orchestrator import JobState

pytestmark = pytest.mark.slow

TASKS = ("demo_mc", "demo_arith", "demo_ppl")
LIMIT = "3"


def _ray_processes(tmpdir: str) -> list[psutil.Process]:
    """Every process of this cluster (they name its temp folder), and every rank actor."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if tmpdir in line or line.startswith("ray::RankActor"):
            found.append(process)
    return found


def rank_actors() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if line.startswith("ray::RankActor"):
            found.append(process)
    return found


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(3, 2) as cluster:
        yield cluster
    wait_for(lambda: not _ray_processes(cluster.tmpdir), 30, "every Ray process to exit")
    shutil.rmtree(cluster.tmpdir, ignore_errors=True)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("ray-models") / "tiny-llama", family="llama")


@pytest.fixture(scope="module")
def reference(llama, tmp_path_factory) -> Path:
    """Samples of a single-process run of every task the tests use."""
    from evalfleet.engines.run import evaluate_request
    from evalfleet.types import EvaluationRequest

    folder = tmp_path_factory.mktemp("ray-reference")
    evaluate_request(EvaluationRequest.model_validate({
        "model": {"path": str(llama)}, "tasks": {"names": list(TASKS), "limit": int(LIMIT)}, "log_samples": True,
        "use_cache": False, "output_dir": str(folder), "engine": "lightweight",
    }))
    return folder


def agrees(reference: Path, folder: Path) -> list[str]:
    actual = load_samples(folder)
    expected = {task: rows for task, rows in load_samples(reference).items() if task in actual}
    assert actual, f"no samples in {folder}"
    return compare_samples(expected, actual)


@pytest.fixture
def fleet(tmp_path):
    with fleet_in(tmp_path) as fleet:
        yield fleet
    wait_for(lambda: not rank_actors(), 30, "the rank actors to exit")


def node_ids(cluster) -> list[str]:
    return [node.node_id for node in cluster.gpu_nodes]


def test_run_spreads_pipeline_stages_and_replicas_over_nodes(cluster, llama, reference, tmp_path):
    from clitools import run_subprocess

    out = tmp_path / "run"
    done = run_subprocess(["run", "--ray", cluster.address, "--model", str(llama), "--tasks", ",".join(TASKS),
                           "--limit", LIMIT, "--strategy", "pp", "--pp", "2", "--dp", "2", "--log-samples",
                           "--no-cache", "--output", str(out)], timeout=600)
    assert done.returncode == 0, done.stderr
    section = json.loads((out / "results.json").read_text())["evalfleet"]
    layout = section["layout"]
    assert (layout["tp"], layout["pp"], layout["dp"]) == (1, 2, 2)
    # the stages decode demo_arith continuously, in step, and their ranks report the steps to the driver
    assert layout["rows_per_decode_step"] >= 1 and layout["oom_halvings"] == 0, layout
    # `auto` on ranks without CUDA: float32, decided by each rank and recorded as they loaded it
    assert section["model"]["dtype"] == layout["dtype"] == "float32" and set(layout["devices"]) == {"cpu"}
    replicas = layout["placement"]
    assert all(len(set(stages)) == 2 for stages in replicas), replicas  # each replica's stages on two nodes
    assert len({node for stages in replicas for node in stages}) == 3
    assert set(node for stages in replicas for node in stages) <= set(node_ids(cluster))
    assert agrees(reference, out) == []


def test_scheduler_runs_three_jobs_side_by_side(cluster, llama, reference, fleet):
    fleet.start("--ray", cluster.address, "--interval", "0.2", "--backoff", "0")
    pool = json.loads(fleet.cli("pool", "--json").stdout)
    assert [len(node["gpus"]) for node in pool["nodes"]] == [2, 2, 2]
    assert {node["name"] for node in pool["nodes"]} == set(node_ids(cluster))
    jobs = {task: fleet.submit("--model", str(llama), "--tasks", task, "--limit", LIMIT, "--gpus", "1",
                               "--log-samples") for task in TASKS}
    for job in jobs.values():
        fleet.wait_state(job, JobState.SUCCEEDED, timeout=300)
    # Side by side: each started before any of them finished.
    events = fleet.events()
    first_end = min(e.at for e in events if e.to_state is JobState.SUCCEEDED)
    assert all(e.at < first_end for e in events if e.to_state is JobState.RUNNING)
    for job in jobs.values():
        status = fleet.status(job)
        assert status["attempts"] == 1, status["events"]
        (replica,) = status["ranks"]
        assert replica[0]["node_id"] in node_ids(cluster)
        assert agrees(reference, Path(status["result_path"]).parent) == []


def test_a_node_lost_mid_job_is_left_and_the_job_finishes_elsewhere(cluster, llama, reference, fleet, monkeypatch):
    for key, value in fault_env("slow_batch:0.4").items():  # reaches the rank actors through runtime_env
        monkeypatch.setenv(key, value)
    fleet.start("--ray", cluster.address, "--interval", "0.2")
    job = fleet.submit("--model", str(llama), "--tasks", "demo_mc,demo_arith", "--limit", LIMIT, "--gpus", "2",
                       "--strategy", "pp", "--pp", "2", "--batch-size", "1", "--log-samples")
    wait_for(lambda: (r := fleet.record(job)).state is JobState.RUNNING and r.done >= 2 and r, 300,
                      "the job to compute")
    ranks = wait_for(lambda: fleet.status(job)["ranks"], 30, "the ranks to be recorded")
    doomed = ranks[0][1]["node_id"]
    node = next(n for n in cluster.gpu_nodes if n.node_id == doomed)
    standby = wait_for(fleet.standby, 120, "a standby driver, imports done and joined to the cluster")
    done_before = fleet.record(job).done
    lose_node(cluster, node)
    cluster.gpu_nodes.remove(node)

    finished = fleet.wait_state(job, JobState.SUCCEEDED, timeout=300)
    status = fleet.status(job)
    lost = [e for e in status["events"] if "lost" in (e["reason"] or "")]
    assert lost, status["events"]
    assert status["failures"] == 1 and status["attempts"] == 2
    assert finished.handle["standby"] is True and finished.pid == standby.pid  # the retry's driver
    assert all(rank["node_id"] != doomed for replica in status["ranks"] for rank in replica)
    document = json.loads(Path(finished.result_path).read_text())
    cache = document["evalfleet"]["cache"]
    # What the first attempt finished came from the cache; only the rest was computed again.
    assert cache["hits"] >= done_before > 0 and cache["computed"] == cache["misses"]
    assert agrees(reference, Path(finished.result_path).parent) == []

    # The dead node's GPUs left the pool; a node that joins is used.
    pool = json.loads(fleet.cli("pool", "--json").stdout)
    assert [(node["alive"], node["gpus"]) for node in pool["nodes"] if node["name"] == doomed] == [(False, [])]
    cluster.gpu_nodes.append(cluster.add_node(num_cpus=1, num_gpus=2))
    cluster.wait_for_nodes()
    joined = cluster.gpu_nodes[-1].node_id
    wait_for(lambda: any(node["name"] == joined and len(node["gpus"]) == 2
                         for node in json.loads(fleet.cli("pool", "--json").stdout)["nodes"]), 30, "the new node")


def test_run_retries_from_the_request_cache_after_a_node_loss(cluster, llama, reference, tmp_path, monkeypatch):
    """`run --ray` whose rank's node dies mid-run says so in one line, runs a second attempt on the
    nodes that remain, resumed from the request cache, and ends with an uninterrupted run's results."""
    import subprocess

    from clitools import evalfleet_command

    for key, value in fault_env("slow_batch:0.4").items():  # reaches the rank actors through runtime_env
        monkeypatch.setenv(key, value)
    cache, out = tmp_path / "cache.sqlite", tmp_path / "run"

    process = subprocess.Popen(
        [*evalfleet_command(), "run", "--ray", cluster.address, "--model", str(llama), "--tasks", "demo_mc,demo_arith",
         "--limit", LIMIT, "--batch-size", "1", "--log-samples", "--cache", str(cache), "--output", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for(lambda: process.poll() is not None or cached_rows(cache) >= 2, 300, "the run to compute")
        assert process.poll() is None, process.communicate()
        (actor,) = rank_actors()
        done_before = cached_rows(cache)
        remove_node_of(cluster, actor)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if len(cluster.gpu_nodes) < 3:  # the module's later tests expect three GPU nodes
            cluster.gpu_nodes.append(cluster.add_node(num_cpus=1, num_gpus=2))
            cluster.wait_for_nodes()
    assert process.returncode == 0, stderr
    retries = [line for line in stderr.splitlines() if line.startswith("attempt ")]
    assert len(retries) == 1 and retries[0].startswith("attempt 1 of 3 failed (") \
        and retries[0].endswith("; retrying in 0s from the request cache"), stderr
    document = json.loads((out / "results.json").read_text())
    assert document["evalfleet"]["cache"]["hits"] >= done_before > 0
    assert agrees(reference, out) == []
    wait_for(lambda: not rank_actors(), 30, "the rank actors to exit")


def test_a_restarted_scheduler_adopts_running_ray_jobs(cluster, llama, reference, fleet, monkeypatch, tmp_path):
    for key, value in fault_env("slow_batch:1.5").items():  # reaches the rank actors through runtime_env
        monkeypatch.setenv(key, value)
    fleet.start("--ray", cluster.address, "--interval", "0.2")
    job = fleet.submit("--model", str(llama), "--tasks", "demo_mc,demo_arith", "--limit", LIMIT, "--gpus", "1",
                       "--batch-size", "1", "--log-samples")
    running = wait_for(lambda: (r := fleet.record(job)).state is JobState.RUNNING and r.done >= 1 and r, 300,
                       "the job to compute")
    found = rank_actors()
    actors = {p.pid for p in found}
    assert len(actors) == 1
    # The fault (and the folder of its sitecustomize) reached the rank through its runtime_env.
    environ = found[0].environ()
    assert environ["EVALFLEET_TEST_FAULT"] == "slow_batch:1.5" and environ["EVALFLEET_WORKER_RANK"] == "0"
    assert environ["PYTHONPATH"].startswith(str(Path(__file__).parents[1] / "faults")), environ["PYTHONPATH"]
    fleet.process.kill()
    fleet.process.wait(30)
    fleet.process = None
    assert psutil.pid_exists(running.pid)  # the job's driver outlives its scheduler

    fleet.log = tmp_path / "second-scheduler.log"
    fleet.start("--ray", cluster.address, "--interval", "0.2")
    assert fleet.record(job).state is JobState.RUNNING  # adopted while it still runs
    seen = set()

    def finished():
        seen.update(p.pid for p in rank_actors())
        return fleet.wait_state(job, JobState.SUCCEEDED, JobState.RUNNING).state is JobState.SUCCEEDED

    wait_for(finished, 300, "the adopted job to finish", interval=0.2)
    assert seen <= actors, "a second set of ranks was started"
    status = fleet.status(job)
    assert status["attempts"] == 1 and status["failures"] == 0, status["events"]
    assert "requeued" not in fleet.log.read_text()
    assert agrees(reference, Path(fleet.record(job).result_path).parent) == []


# With this process as a driver of the cluster ------------------------------------------------------


@pytest.fixture(scope="module")
def ray_driver(cluster):
    """This process joins the cluster, to schedule in-process and to start rank actors itself."""
    import ray

    from evalfleet.runtime.ray_ranks import connect

    connect(cluster.address)
    yield
    ray.shutdown()


def test_ray_ranks_decide_the_dtype_on_their_own_gpus(cluster, ray_driver, llama, tmp_path, monkeypatch):
    """This process, the driver, has no GPU (as the Ray executor starts it); its ranks see an H100 at the
    CUDA boundary (`fake_cuda`), so `auto` is the bfloat16 they load, and results.json says so."""
    from evalfleet.engines.ray_engine import evaluate_on_ray
    from evalfleet.types import EvaluationRequest

    for key, value in fault_env("fake_cuda:NVIDIA H100 80GB HBM3:80:1").items():  # reaches the rank actors
        monkeypatch.setenv(key, value)
    request = EvaluationRequest.model_validate({
        "model": {"path": str(llama)}, "tasks": {"names": ["demo_mc"], "limit": 2}, "use_cache": False,
        "output_dir": str(tmp_path),
    })
    section = evaluate_on_ray(request, cluster.address).evalfleet
    assert section["model"]["dtype"] == section["layout"]["dtype"] == "bfloat16"
    assert section["layout"]["devices"] == ["cuda"]
    wait_for(lambda: not rank_actors(), 30, "the rank actor to exit")


def test_a_node_lost_in_the_round_that_places_another_job_is_not_placed_on(cluster, ray_driver, llama, tmp_path,
                                                                          monkeypatch):
    """The issue's hang: the node of a low-priority job dies in the round that places a high-priority
    one. The round collects the lost job, re-reads the pool and places both jobs on live nodes only
    (the dead node's GPUs were warm with their model, so a stale pool would have drawn them there)."""
    import ray

    from evalfleet.orchestrator import DistributedEvaluationOrchestrator
    from evalfleet.orchestrator.executors.base import Exited
    from evalfleet.orchestrator.executors.ray import ray_pool_and_executor

    for key, value in fault_env("slow_batch:1.5").items():  # reaches the rank actors through runtime_env
        monkeypatch.setenv(key, value)
    db = tmp_path / "jobs.sqlite"
    inventory, executor = ray_pool_and_executor(cluster.address, db, grace_s=5.0)
    orchestrator = DistributedEvaluationOrchestrator(db, inventory, executor)
    request = {"model": {"path": str(llama)}, "tasks": {"names": ["demo_mc", "demo_arith"], "limit": int(LIMIT)},
               "gpus": 1, "batch_size": 1}
    starts = []

    def rounds_until(condition, timeout, what):
        def one_round():
            starts.extend(asyncio.run(orchestrator.run_once()).starts)
            failed = orchestrator.list([JobState.FAILED])
            assert not failed, [(r.id, r.error) for r in failed]
            return condition()

        return wait_for(one_round, timeout, what, interval=0.2)

    try:
        low = orchestrator.submit_evaluation_request({**request, "priority": "low"})
        rounds_until(lambda: (r := orchestrator.status(low)).state is JobState.RUNNING and r.done >= 1, 300,
                     "the low-priority job to compute")
        ((lost, _),) = orchestrator.status(low).placement
        doomed = executor.order[lost]
        node = next(n for n in cluster.gpu_nodes if n.node_id == doomed)
        high = orchestrator.submit_evaluation_request({**request, "priority": "high"})
        poll = executor.poll

        def poll_as_the_node_dies(handle):
            """The node dies after the round began, before it collects exits; it ends once Ray knows."""
            if handle.job_id != low or node not in cluster.gpu_nodes:
                return poll(handle)
            lose_node(cluster, node)
            cluster.gpu_nodes.remove(node)

            def exited():
                status = poll(handle)
                return status if isinstance(status, Exited) else None

            status = wait_for(exited, 60, "the low-priority job's driver to exit with its node")
            wait_for(lambda: not any(n["NodeID"] == doomed and n["Alive"] for n in ray.nodes()), 60,
                     "Ray to declare the node dead")
            return status

        def on_the_lost_node(placed):
            return [(start.job_id, start.devices) for start in placed if any(n == lost for n, _ in start.devices)]

        monkeypatch.setattr(executor, "poll", poll_as_the_node_dies)
        before = len(starts)
        starts.extend(asyncio.run(orchestrator.run_once()).starts)
        assert node not in cluster.gpu_nodes and high in {start.job_id for start in starts[before:]}
        assert orchestrator.status(low).attempts == 1  # lost with its node, requeued in the same round
        assert on_the_lost_node(starts[before:]) == []

        rounds_until(lambda: all(orchestrator.status(job).state is JobState.SUCCEEDED for job in (low, high)), 300,
                     "both jobs to succeed after the node loss")
        assert on_the_lost_node(starts[before:]) == []
        assert orchestrator.status(high).attempts == 0  # placed once, on live nodes, and never waited out
    finally:
        orchestrator.shutdown()
        orchestrator.store.close()
        if len(cluster.gpu_nodes) < 3:  # the module's later tests expect three GPU nodes
            cluster.gpu_nodes.append(cluster.add_node(num_cpus=1, num_gpus=2))
            cluster.wait_for_nodes()
    wait_for(lambda: not rank_actors(), 30, "the rank actors to exit")


def test_a_placement_group_that_cannot_be_reserved_is_removed_within_its_bound(ray_driver, llama):
    """Bundles pinned to a node Ray does not have (as a node that died after the job was placed)
    are never reserved: the ranks give up as a lost node after `placement_timeout`, group removed."""
    from ray.util import placement_group_table

    from evalfleet.runtime.group import GroupSpec
    from evalfleet.runtime.ray_ranks import RayGroupRunner
    from evalfleet.types import NodeLost

    before = set(placement_group_table())
    runner = RayGroupRunner(GroupSpec(str(llama)), 1, ["f" * 56], placement_timeout=2.0)
    began = time.monotonic()
    outcome = bounded(runner.start, 60, "the placement group")
    assert isinstance(outcome, NodeLost) and "could not reserve 1 GPU(s) for this job in 2s" in str(outcome)
    assert time.monotonic() - began < 30
    groups = placement_group_table()
    assert [groups[key]["state"] for key in set(groups) - before] == ["REMOVED"]


def test_a_batch_past_the_batch_timeout_fails_the_run_as_infrastructure(ray_driver, llama, monkeypatch):
    from evalfleet.runtime.backends.base import LoglikelihoodItem
    from evalfleet.runtime.group import GroupSpec
    from evalfleet.runtime.ray_ranks import RayGroupRunner
    from evalfleet.types import InfrastructureError, NodeLost

    for key, value in fault_env("slow_batch:30").items():  # reaches the rank actor through runtime_env
        monkeypatch.setenv(key, value)
    runner = RayGroupRunner(GroupSpec(str(llama)), 1, batch_timeout=2.0).start()
    try:
        began = time.monotonic()
        outcome = bounded(lambda: runner.run([[LoglikelihoodItem((1, 2), (3,))]], lambda index, results: None), 60,
                          "the batch")
        assert isinstance(outcome, InfrastructureError) and not isinstance(outcome, NodeLost), outcome
        assert str(outcome) == "replica 0 did not finish batch 0 in 2s"
        assert time.monotonic() - began < 20
    finally:
        runner.close()
    wait_for(lambda: not rank_actors(), 30, "the rank actor to exit")


def _oom_batches() -> list:
    """Three log-likelihood batches of four rows of 20 tokens (80 padded tokens, left padding inside each
    row's context), so that `oom_above:50` fails each whole batch and fits each half of one."""
    import random

    from evalfleet.runtime.backends.base import LoglikelihoodItem

    rng = random.Random(11)
    rows = []
    for _ in range(12):
        split = rng.randint(5, 15)
        tokens = tuple(rng.randrange(2, 200) for _ in range(20))
        rows.append(LoglikelihoodItem(tokens[:split], tokens[split:]))
    return [rows[i:i + 4] for i in range(0, 12, 4)]


@pytest.mark.parametrize("tp", [1, 2])
def test_out_of_memory_on_ray_ranks_halves_the_budget_and_gives_the_same_results(ray_driver, llama, monkeypatch, tp):
    """As in local groups: a rank that runs out of memory answers "oom", the replica's budget is halved
    for good (a tp group is started again first) and the batch is computed in halves, with the same results."""
    from evalfleet.runtime.backends.hf import HFBackend
    from evalfleet.runtime.group import GroupSpec
    from evalfleet.runtime.ray_ranks import RayGroupRunner
    from evalfleet.runtime.runner import InProcessRunner

    batches = _oom_batches()
    backend = HFBackend.load(str(llama), dtype="float32", device="cpu")
    try:
        expected: dict[int, list] = {}
        InProcessRunner(backend, "cpu").run(batches, expected.__setitem__)
    finally:
        backend.close()
    for key, value in fault_env("oom_above:50").items():  # reaches the rank actors through runtime_env
        monkeypatch.setenv(key, value)
    runner = RayGroupRunner(GroupSpec(str(llama), dtype="float32", device="cpu", tp=tp, threads=1), 1).start()
    try:
        got: dict[int, list] = {}
        outcome = bounded(lambda: runner.run(batches, got.__setitem__), 300, "the batches")
        description = runner.describe()
    finally:
        runner.close()
    assert outcome is None and sorted(got) == [0, 1, 2], outcome
    for index, rows in expected.items():  # halves pad differently: equal within the project's tolerance
        for want, have in zip(rows, got[index], strict=True):
            assert abs(have[0] - want[0]) <= 1e-4 + 1e-5 * abs(want[0]) and bool(have[1]) == bool(want[1]), index
    # Halved once, on the first batch; the budget held for the batches after it.
    assert description["oom_halvings"] == 1 and description["token_budgets"] == [40], description
    assert description["oom_restarts"] == (1 if tp > 1 else 0)
    wait_for(lambda: not rank_actors(), 30, "the rank actors to exit")
