"""Live elastic width: the policy's grow and shrink decisions, and their orders in the job store."""

from __future__ import annotations

import pytest
from sample_jobs import demand, queued

from evalfleet.orchestrator.policy import PolicyOptions, RunningJob, create_allocation_plan, growth_pays
from evalfleet.orchestrator.states import JobState
from evalfleet.orchestrator.store import JobStore
from evalfleet.planning import Inventory
from evalfleet.types import EvalfleetError

FOUR = Inventory.from_spec("4xH100-80GB")


def _running(job_id="r", devices=((0, 0),), *, priority="normal", replicas=4, seconds=400.0, load_s=10.0,
             leaving=(), min_replicas=1, end=None):
    need = demand(replicas=replicas, seconds=seconds, min_replicas=min_replicas, startup=60.0)
    width = len(devices) - len(leaving)
    return RunningJob(job_id, tuple(devices), end if end is not None else seconds / width, priority,
                      demand=need, resizable=True, leaving=tuple(leaving), load_s=load_s)


def test_growth_pays_only_when_the_new_replica_shortens_the_job_after_its_load():
    job = demand(replicas=2, seconds=100.0)
    assert growth_pays(job, 1, load_s=10.0, min_gain=0.1)  # 10 + 45 = 55 s instead of 100 s
    assert not growth_pays(job, 1, load_s=95.0, min_gain=0.1)  # 95 + 2.5 s: not 10% sooner
    assert not growth_pays(job, 1, load_s=120.0, min_gain=0.1)  # done before the replica is loaded
    assert not growth_pays(job, 2, load_s=1.0, min_gain=0.1)  # already at its widest


def test_idle_gpus_that_no_waiting_job_can_use_grow_a_running_job_one_replica_per_round():
    plan = create_allocation_plan([], FOUR, [_running(devices=((0, 0), (0, 1)))], now=0.0)
    assert [(g.job_id, len(g.devices)) for g in plan.grows] == [("r", 1)]
    assert set(plan.grows[0].devices) <= {(0, 2), (0, 3)}
    # not a job whose worker cannot resize, nor one with little left, nor without the option
    fixed = RunningJob("r", ((0, 0),), 400.0, demand=demand(replicas=4, seconds=400.0))
    assert create_allocation_plan([], FOUR, [fixed], now=0.0).grows == ()
    assert create_allocation_plan([], FOUR, [_running(seconds=5.0)], now=0.0).grows == ()
    off = PolicyOptions(resize=False)
    assert create_allocation_plan([], FOUR, [_running()], now=0.0, options=off).grows == ()


def test_a_queued_job_takes_free_gpus_before_a_running_job_grows():
    running = [_running(devices=((0, 0), (0, 1)))]
    plan = create_allocation_plan([queued("q", replicas=2, min_replicas=2, seconds=50.0)], FOUR, running, now=0.0)
    assert [s.job_id for s in plan.starts] == ["q"] and plan.grows == ()


def test_a_higher_class_job_gets_the_newest_replica_of_a_lower_one_without_preemption():
    low = _running("low", ((0, 0), (0, 1), (0, 2), (0, 3)), priority="low", seconds=4000.0)
    plan = create_allocation_plan([queued("high", "high", seconds=50.0)], FOUR, [low], now=0.0)
    assert plan.preempt == () and plan.starts == ()
    assert [(s.job_id, s.devices) for s in plan.shrinks] == [("low", ((0, 3),))]
    assert plan.reservation.job_id == "high" and plan.reservation.start_at == 0.0
    assert "waiting for low to give back 1 replica(s)" in plan.waiting["high"]
    # Next round, while the replica finishes its batch: no second order, the device is reserved.
    leaving = _running("low", low.devices, priority="low", seconds=4000.0, leaving=((0, 3),))
    plan = create_allocation_plan([queued("high", "high", seconds=50.0)], FOUR, [leaving], now=1.0)
    assert plan.shrinks == () and plan.grows == ()
    assert plan.reservation.devices == frozenset({(0, 3)})
    # Once it is gone, the high job starts there.
    gone = _running("low", low.devices[:3], priority="low", seconds=4000.0)
    plan = create_allocation_plan([queued("high", "high", seconds=50.0)], FOUR, [gone], now=2.0)
    assert [(s.job_id, s.devices) for s in plan.starts] == [("high", ((0, 3),))]


@pytest.mark.parametrize("case", ["same class", "at its fewest", "frees soon anyway", "not resizable"])
def test_no_replica_is_taken_when_it_should_not_be(case):
    low = {"same class": _running(devices=((0, 0), (0, 1), (0, 2), (0, 3)), priority="high", seconds=4000.0),
           "at its fewest": _running(devices=((0, 0), (0, 1), (0, 2), (0, 3)), priority="low", min_replicas=4,
                                     seconds=4000.0),
           "frees soon anyway": _running(devices=((0, 0), (0, 1), (0, 2), (0, 3)), priority="low", seconds=20.0),
           "not resizable": RunningJob("r", ((0, 0), (0, 1), (0, 2), (0, 3)), 1000.0, "low",
                                       demand=demand(replicas=4, seconds=4000.0))}[case]
    plan = create_allocation_plan([queued("high", "high", seconds=50.0)], FOUR, [low], now=0.0)
    assert plan.shrinks == () and plan.starts == ()


def test_preemption_spares_a_job_whose_restart_costs_more_than_the_wait():
    victim = RunningJob("low", tuple((0, g) for g in range(4)), 900.0, "low", demand=demand(seconds=900.0, startup=1200.0))
    options = PolicyOptions(preemption=True, preempt_after_s=300.0, resize=False)
    plan = create_allocation_plan([queued("high", "high", tp=4)], FOUR, [victim], now=0.0, options=options)
    assert plan.preempt == ()
    cheap = RunningJob("low", victim.devices, 900.0, "low", demand=demand(seconds=900.0, startup=60.0))
    plan = create_allocation_plan([queued("high", "high", tp=4)], FOUR, [cheap], now=0.0, options=options)
    assert plan.preempt == ("low",)


def _running_job(store: JobStore) -> str:
    job = store.add({"model": "m"}, priority="normal", max_attempts=3, now=0.0)
    store.transition(job, JobState.PLACED, placement=[(0, 0)], now=1.0)
    store.transition(job, JobState.RUNNING, now=2.0)
    return job


def test_replica_orders_go_through_the_store_and_move_the_placement(tmp_path):
    with JobStore(tmp_path / "jobs.db") as store:
        job = _running_job(store)
        with pytest.raises(EvalfleetError, match="cannot be resized"):  # its worker has not said it can
            store.order_growth(job, [(0, 1)], {})
        store.open_resize(job, {"replica-0": [(0, 0)]}, load_s=3.5)
        store.order_growth(job, [(0, 1)], {"EVALFLEET_THREADS": "1"})
        record = store.get(job)
        assert record.placement == [(0, 0), (0, 1)]  # held at once, so no one else takes it
        assert store.take_orders(job) == ([{"devices": [(0, 1)], "env": {"EVALFLEET_THREADS": "1"}}], [])
        assert store.take_orders(job) == ([], [])  # taken once
        assert store.get(job).resize["joining"] == [[[0, 1]]]
        store.replica_joined(job, "replica-1", [(0, 1)])
        assert store.get(job).resize["replicas"] == {"replica-0": [[0, 0]], "replica-1": [[0, 1]]}

        store.order_shrink(job, [(0, 1)], "a high job waits")
        assert store.take_orders(job) == ([], [[(0, 1)]])
        assert store.get(job).placement == [(0, 0), (0, 1)]  # until the replica is gone
        store.replica_left(job, [(0, 1)], "given back to the pool")
        record = store.get(job)
        assert record.placement == [(0, 0)] and record.resize["leaving"] == []
        assert list(record.resize["replicas"]) == ["replica-0"]
        reasons = [e.reason for e in store.events(job) if e.from_state is JobState.RUNNING]
        assert any("grows by a replica on 0:1" in r for r in reasons)
        assert any("gave back 0:1" in r for r in reasons)

        store.transition(job, JobState.QUEUED, placement=None)
        assert store.get(job).resize is None  # a requeued job starts with the width it is given
        with pytest.raises(EvalfleetError, match="queued"):
            store.order_shrink(job, [(0, 0)], "x")


def test_a_refused_shrink_keeps_the_replica(tmp_path):
    with JobStore(tmp_path / "jobs.db") as store:
        job = _running_job(store)
        store.open_resize(job, {"replica-0": [(0, 0)]}, load_s=1.0)
        store.order_shrink(job, [(0, 0)], "x")
        store.take_orders(job)
        store.replica_kept(job, [(0, 0)], "its last replica")
        record = store.get(job)
        assert record.placement == [(0, 0)] and record.resize["leaving"] == []


def test_on_cpu_slots_a_data_parallel_job_may_use_one_to_every_slot(tmp_path):
    from evalfleet.orchestrator.demand import size_request, slot_inventory
    from evalfleet.types import EvaluationRequest, UsageError

    def sized(**hints):
        request = EvaluationRequest.model_validate({"model": {"path": "demo"}, "tasks": {"names": "demo_arith", "limit": 4},
                                                    "strategy": "dp", "output_dir": str(tmp_path), **hints})
        return size_request(request, slot_inventory(3))[1]

    elastic = sized()
    assert elastic.min_replicas == 1 and elastic.max_replicas == 3
    assert elastic.tokens_per_s[2] == pytest.approx(3 * elastic.tokens_per_s[0])
    assert sized(gpus=2).max_replicas == 2
    fixed = sized(dp=2)
    assert (fixed.min_replicas, fixed.max_replicas) == (2, 2)
    with pytest.raises(UsageError, match="needs 4 slots"):
        sized(dp=4)
    with pytest.raises(UsageError, match="drop --tp and --pp"):
        sized(tp=2)


def test_status_shows_the_width_now_and_its_range(tmp_path):
    from evalfleet.orchestrator.console import describe_width, job_width

    with JobStore(tmp_path / "jobs.db") as store:
        job = store.add({"model": "m"}, priority="normal", max_attempts=1, demand=demand(replicas=3).to_dict())
        assert job_width(store.get(job))["replicas"] == 0
        store.transition(job, JobState.PLACED, placement=[(0, 0)])
        store.transition(job, JobState.RUNNING)
        store.open_resize(job, {"replica-0": [(0, 0)]}, load_s=1.0)
        store.order_growth(job, [(0, 1)], {})
        width = job_width(store.get(job))
        assert width == {"replicas": 2, "fewest": 1, "most": 3, "live": True, "joining": 1, "leaving": 0}
        assert describe_width(width) == "2 now (1 to 3, resized while it runs; 1 joining)"
    assert describe_width({**width, "most": 1}) == ""
    assert describe_width({**width, "replicas": 0, "live": False, "joining": 0}) == "1 to 3"


def test_a_running_job_never_grows_onto_gpus_a_starting_job_was_widened_to():
    running = [_running(devices=((0, 0),))]
    plan = create_allocation_plan([queued("q", replicas=4, seconds=100.0)], FOUR, running, now=0.0)
    started = {d for s in plan.starts for d in s.devices}
    assert started == {(0, 1), (0, 2), (0, 3)}  # widened onto every idle GPU
    assert plan.grows == ()


def test_no_gpus_are_taken_for_a_job_that_would_rather_wait_for_a_wider_start():
    """Preempting (or narrowing) for a start that the next round would not make only churns."""
    low = RunningJob("low", ((0, 0), (0, 1)), 1000.0, "low", demand=demand(seconds=1000.0, startup=10.0))
    other = RunningJob("other", ((0, 2), (0, 3)), 1000.0, "high", preemptible=False)
    options = PolicyOptions(preemption=True, preempt_after_s=300.0)
    wide = queued("high", "high", replicas=4, seconds=40_000.0)  # 4 at t=1000 end at 11,000; 2 now at 20,000
    plan = create_allocation_plan([wide], FOUR, [low, other], now=0.0, options=options)
    assert plan.preempt == () and plan.reservation.start_at == 1000.0
    narrow = queued("high", "high", replicas=4, seconds=1500.0)  # 2 now end at 750; 4 at t=1000 at 1375
    plan = create_allocation_plan([narrow], FOUR, [low, other], now=0.0, options=options)
    assert plan.preempt == ("low",)


def test_the_scheduler_sees_a_shrink_order_not_yet_taken_as_devices_leaving(tmp_path):
    """The order sits in the store until the worker's next poll; a round in between must read it."""
    from evalfleet.orchestrator.scheduler import DistributedEvaluationOrchestrator

    with JobStore(tmp_path / "jobs.db") as store:
        job = store.add({"model": "m"}, priority="low", max_attempts=1, demand=demand(replicas=2, seconds=4000.0).to_dict())
        store.transition(job, JobState.PLACED, placement=[(0, 0), (0, 1)])
        store.transition(job, JobState.RUNNING)
        store.open_resize(job, {"replica-0": [(0, 0)], "replica-1": [(0, 1)]}, load_s=1.0)
        store.order_shrink(job, [(0, 1)], "a high job waits")
        scheduler = DistributedEvaluationOrchestrator(store, Inventory.from_spec("2xH100-80GB"))
        store.add({"model": "m"}, priority="high", max_attempts=1, demand=demand(seconds=50.0).to_dict())
        plan = scheduler.create_allocation_plan(now=0.0)
        assert plan.reservation.devices == frozenset({(0, 1)}) and plan.shrinks == ()
