"""The Ray pool's bookkeeping, node-loss recovery and the simulator's node failures, without a cluster."""

from __future__ import annotations

import asyncio
import json

import pytest

from evalfleet.engines.ray_engine import ray_layout, spread_over_nodes
from evalfleet.orchestrator import DistributedEvaluationOrchestrator
from evalfleet.orchestrator.demand import JobDemand
from evalfleet.orchestrator.executors.base import RUNNING, Executor, Exited, Handle
from evalfleet.orchestrator.ray_pool import inventory_from_ray, node_gpus
from evalfleet.orchestrator.recovery import RecoveryOptions, recover
from evalfleet.orchestrator.simulator import NodeFailures, simulate
from evalfleet.orchestrator.states import JobState
from evalfleet.orchestrator.store import JobStore
from evalfleet.orchestrator.workload import synthetic_trace
from evalfleet.planning import Inventory
from evalfleet.types import EvalfleetError, EvaluationRequest, NodeLost


def _node(node_id: str, gpus: int, alive: bool = True, **resources: float) -> dict:
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": 4.0, "GPU": float(gpus), **resources}}


def test_gpus_come_from_ray_resources():
    h100 = node_gpus({"GPU": 8.0, "accelerator_type:H100": 1.0})
    assert len(h100) == 8 and h100[0].name == "H100" and h100[0].total_gb == 80
    declared = node_gpus({"GPU": 2.0, "memory": 8 * 2**30})
    assert [gpu.total_gb for gpu in declared] == [4.0, 4.0] and not declared[0].is_cpu
    assert node_gpus({"CPU": 4.0}) == []


def test_nodes_keep_their_index_when_one_dies_and_another_joins():
    inventory, order = inventory_from_ray([_node("b", 2), _node("a", 2), _node("head", 0)])
    assert order == ["a", "b"] and [len(n.gpus) for n in inventory.nodes] == [2, 2]
    inventory, order = inventory_from_ray([_node("b", 2), _node("a", 2, alive=False), _node("c", 4)], order)
    assert order == ["a", "b", "c"]
    assert [(n.name, len(n.gpus)) for n in inventory.nodes] == [("a", 0), ("b", 2), ("c", 4)]
    assert inventory.num_gpus == 6


def test_run_spreads_groups_and_keeps_tp_groups_inside_a_node():
    assert spread_over_nodes({"a": 2, "b": 2, "c": 2}, 1, 4) == ["a", "b", "c", "a"]
    assert spread_over_nodes({"a": 4, "b": 2}, 2, 3) == ["a", "a", "a", "a", "b", "b"]
    with pytest.raises(EvalfleetError, match="no node with 4 free GPU"):
        spread_over_nodes({"a": 2, "b": 2}, 4, 1)
    request = EvaluationRequest.model_validate({"model": {"path": "demo"}, "tasks": {"names": "demo_mc"},
                                                "strategy": "pp", "dp": 3})
    assert ray_layout(request) == (1, 2, 3)


def test_a_lost_node_requeues_at_once_without_blaming_devices(tmp_path):
    with JobStore(tmp_path / "jobs.db") as store:
        job = store.add({"model": {"path": "demo"}}, priority="normal", max_attempts=3, now=0.0)
        store.transition(job, JobState.PLACED, placement=[[0, 0]], now=1.0)
        store.transition(job, JobState.RUNNING, now=1.0)
        decision = recover(store, job, "node lost", 10.0, RecoveryOptions(backoff_base_s=30), blame_devices=False,
                           backoff=False)
        assert decision.action == "requeued" and decision.retry_at == 10.0
        assert store.get(job).not_before == 10.0 and store.quarantined() == {}


class _NodeLostMidRound(Executor):
    """Two Ray nodes; `poll` finds the doomed job's driver gone with its node, which died after the
    round began (so a pool read at the start of the round still lists it)."""

    name = "ray"
    self_reporting = True

    def __init__(self) -> None:
        self.dead: set[str] = set()
        self.doomed: str | None = None

    def current_pool(self) -> Inventory:
        return inventory_from_ray([_node(name, 2, alive=name not in self.dead) for name in "ab"], ["a", "b"])[0]

    def launch(self, job, placement) -> Handle:
        return Handle(job.id, data={"nodes": ["ab"[node] for node, _ in placement]})

    def poll(self, handle):
        if handle.job_id != self.doomed:
            return RUNNING
        self.dead.update(handle.data["nodes"])
        return Exited(NodeLost.exit_code)

    def cancel(self, handle) -> None:
        pass

    def reattach(self, job):
        return None


def test_a_round_places_on_the_pool_as_it_is_after_collecting_a_lost_node(tmp_path):
    executor = _NodeLostMidRound()
    orchestrator = DistributedEvaluationOrchestrator(tmp_path / "jobs.db", executor.current_pool(), executor)
    store = orchestrator.store
    request, demand = {"model": {"path": "m"}, "tasks": {"names": ["demo_mc"]}}, JobDemand("m", 1e6, (100.0,))
    low = store.add(request, priority="low", max_attempts=3, demand=demand.to_dict())
    asyncio.run(orchestrator.run_once())
    ((lost, _),) = store.get(low).placement
    high = store.add(request, priority="high", max_attempts=3, demand=demand.to_dict())
    executor.doomed = low  # its node dies in the round that places the high-priority job

    plan = asyncio.run(orchestrator.run_once())
    starts = {start.job_id: [node for node, _ in start.devices] for start in plan.starts}
    assert set(starts) == {high, low}, plan.waiting  # requeued at once, and placed with the newcomer
    # Both on the node that remains, though the lost one's GPUs were warm with their model.
    assert all(lost not in nodes for nodes in starts.values()), starts
    assert [len(node.gpus) for node in orchestrator.inventory.nodes][lost] == 0


def test_simulated_node_losses_cost_less_with_the_cache_than_restarting_from_zero():
    inventory = Inventory.from_spec("2x8xH100-80GB")
    trace = synthetic_trace(inventory, jobs=30, seed=3, arrival_window_s=600.0, work_tokens=(1e6, 3e7))
    report = {}
    for from_zero in (False, True):
        failures = NodeFailures(every_s=900.0, repair_s=600.0, restart_from_zero=from_zero)
        report[from_zero] = simulate(trace, inventory, _policy(), node_failures=failures)
    ours, baseline = report[False], report[True]
    assert ours.nodes_lost > 0 and ours.jobs_hit_by_node_loss > 0
    assert ours.unfinished == baseline.unfinished == 0
    assert ours.lost_gpu_s < baseline.lost_gpu_s
    assert ours.lost_gpu_s <= ours.jobs_hit_by_node_loss * 16 * failures.in_flight_s


def _policy():
    import functools

    from evalfleet.orchestrator.policy import PolicyOptions, create_allocation_plan

    return functools.partial(create_allocation_plan, options=PolicyOptions())


def test_ray_flags_refuse_a_second_pool_and_pool_json_reads_the_store(capsys, monkeypatch, tmp_path):
    from clitools import run_main

    code, out, err = run_main(["scheduler", "--ray", "auto", "--slots", "2"], capsys, monkeypatch)
    assert code == 2 and out == "" and err == "error: with --ray the Ray cluster is the pool; drop --gpus and --slots\n"

    from evalfleet.orchestrator.pool import record_pool

    inventory, _ = inventory_from_ray([_node("a", 2), _node("b", 1)])
    with JobStore(tmp_path / "jobs.sqlite") as store:
        record_pool(store, inventory, max_attempts=3)
        job = store.add({"model": {"path": "demo"}, "tasks": {"names": ["demo_mc"]}}, priority="normal", max_attempts=3, now=0.0)
        store.transition(job, JobState.PLACED, placement=[[1, 0]], now=1.0)
        store.quarantine((0, 1), "three jobs failed on it")
        from evalfleet.orchestrator.pool_status import record_ranks

        record_ranks(store, job, [[{"rank": 0, "node_id": "b" * 56, "address": "10.0.0.2", "pid": 7,
                                    "device": "cpu"}]])
    code, out, err = run_main(["pool", "--json"], capsys, monkeypatch)
    assert code == 0, err
    document = json.loads(out)
    assert [(n["name"], len(n["gpus"])) for n in document["nodes"]] == [("a", 2), ("b", 1)]
    assert document["nodes"][1]["gpus"][0]["job"] == job
    assert [(q["node"], q["gpu"], q["reason"]) for q in document["quarantined"]] == [(0, 1, "three jobs failed on it")]
    assert [(r["job"], r["replicas"][0][0]["address"]) for r in document["ranks"]] == [(job, "10.0.0.2")]
    code, out, _ = run_main(["pool"], capsys, monkeypatch)
    assert code == 0 and "rank 0 on node bbbbbbbb (10.0.0.2)" in out
    code, out, _ = run_main(["status", job], capsys, monkeypatch)
    assert code == 0 and "rank 0 on node bbbbbbbb" in out
