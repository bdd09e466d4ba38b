"""The pure scheduling policy: gangs, priorities, aging, backfill, elasticity, affinity, preemption."""

from __future__ import annotations

from sample_jobs import demand, queued

from evalfleet.orchestrator.policy import (
    PolicyOptions,
    QueuedJob,
    RunningJob,
    create_allocation_plan,
    effective_rank,
    queue_order,
)
from evalfleet.planning import Inventory

TWO_NODES = Inventory.from_spec("2x4xH100-80GB")
ONE_NODE = Inventory.from_spec("4xH100-80GB")


def _starts(plan):
    return {s.job_id: s for s in plan.starts}


def test_gang_places_every_replica_with_tp_groups_inside_a_node():
    plan = create_allocation_plan([queued("a", tp=4, replicas=2, min_replicas=2)], TWO_NODES, [], now=0.0)
    start = _starts(plan)["a"]
    assert start.replicas == 2 and len(start.devices) == 8
    groups = [start.devices[:4], start.devices[4:]]
    assert all(len({node for node, _ in group}) == 1 for group in groups)
    assert set(start.devices) == {(n, g) for n in range(2) for g in range(4)}


def test_a_gang_never_starts_partially():
    running = [RunningJob("r", ((0, 0),), expected_end=50.0)]
    plan = create_allocation_plan([queued("a", tp=4, replicas=1)], ONE_NODE, running, now=0.0)
    assert plan.starts == ()
    assert plan.reservation.job_id == "a" and plan.reservation.start_at == 50.0


def test_priority_classes_order_the_queue():
    queue = [queued("low", "low"), queued("normal", "normal"), queued("high", "high")]
    plan = create_allocation_plan(queue, Inventory.from_spec("1xH100-80GB"), [], now=0.0)
    assert list(_starts(plan)) == ["high"]
    assert [j.id for j in queue_order(queue, 0.0, 3600.0)] == ["high", "normal", "low"]


def test_aging_lets_an_old_low_job_overtake_fresh_higher_ones():
    old_low = queued("old", "low", submitted=0.0)
    fresh_high = queued("fresh", "high", submitted=9000.0)
    assert effective_rank(old_low, 9000.0, 3600.0) == 2.5
    assert [j.id for j in queue_order([fresh_high, old_low], 9000.0, 3600.0)] == ["old", "fresh"]
    assert [j.id for j in queue_order([fresh_high, old_low], 5000.0, 3600.0)] == ["fresh", "old"]
    plan = create_allocation_plan([fresh_high, old_low], Inventory.from_spec("1xH100-80GB"), [], now=9000.0,
                                  options=PolicyOptions(aging_s=3600.0))
    assert list(_starts(plan)) == ["old"]


def test_ties_go_to_the_earlier_submission():
    queue = [queued("b", submitted=2.0), queued("a", submitted=1.0)]
    assert [j.id for j in queue_order(queue, 10.0, 3600.0)] == ["a", "b"]


def test_backoff_keeps_a_job_out_until_its_time():
    job = queued("a", not_before=100.0)
    assert create_allocation_plan([job], ONE_NODE, [], now=50.0).starts == ()
    assert list(_starts(create_allocation_plan([job], ONE_NODE, [], now=100.0))) == ["a"]


def test_backfill_takes_idle_gpus_only_without_delaying_the_reservation():
    running = [RunningJob("r", ((0, 0), (0, 1)), expected_end=100.0)]
    queue = [
        queued("big", "high", tp=4),
        queued("short", "low", submitted=1.0, seconds=80.0),
        queued("long", "low", submitted=2.0, seconds=500.0),
    ]
    plan = create_allocation_plan(queue, ONE_NODE, running, now=0.0)
    assert plan.reservation.job_id == "big" and plan.reservation.start_at == 100.0
    starts = _starts(plan)
    assert "short" in starts and starts["short"].expected_end <= 100.0 and starts["short"].backfilled
    assert "long" not in starts
    assert "delaying big" in plan.waiting["long"]


def test_backfill_may_run_long_outside_the_reserved_gpus():
    running = [
        RunningJob("whole-node", tuple((0, g) for g in range(4)), expected_end=100.0),
        RunningJob("half-node", ((1, 0), (1, 1)), expected_end=10_000.0),
    ]
    queue = [queued("big", "high", tp=4), queued("long", "low", seconds=5000.0, replicas=2)]
    plan = create_allocation_plan(queue, TWO_NODES, running, now=0.0)
    assert plan.reservation.job_id == "big" and plan.reservation.devices == {(0, g) for g in range(4)}
    assert set(_starts(plan)["long"].devices) == {(1, 2), (1, 3)}


def test_without_backfill_everything_waits_behind_the_reservation():
    running = [RunningJob("r", ((0, 0),), expected_end=100.0)]
    queue = [queued("big", "high", tp=4), queued("short", "low", seconds=1.0)]
    plan = create_allocation_plan(queue, ONE_NODE, running, now=0.0, options=PolicyOptions(backfill=False))
    assert plan.starts == () and plan.waiting["short"] == "behind big"


def test_elastic_start_with_fewer_replicas_when_that_finishes_sooner():
    running = [RunningJob("r", ((0, 2), (0, 3)), expected_end=1000.0)]
    job = queued("a", replicas=4, seconds=400.0)
    plan = create_allocation_plan([job], ONE_NODE, running, now=0.0)
    assert _starts(plan)["a"].replicas == 2
    rigid = create_allocation_plan([job], ONE_NODE, running, now=0.0, options=PolicyOptions(elastic=False))
    assert rigid.starts == () and rigid.reservation.start_at == 1000.0


def test_elastic_waits_when_more_replicas_soon_finish_sooner():
    running = [RunningJob("r", ((0, 2), (0, 3)), expected_end=10.0)]
    plan = create_allocation_plan([queued("a", replicas=4, seconds=4000.0)], ONE_NODE, running, now=0.0)
    assert plan.starts == () and plan.reservation.start_at == 10.0 and len(plan.reservation.devices) == 4


def test_a_short_queue_gets_wide_jobs_and_a_deep_one_narrow_jobs():
    alone = create_allocation_plan([queued("a", replicas=8, seconds=800.0)], TWO_NODES, [], now=0.0)
    assert _starts(alone)["a"].replicas == 8
    crowd = [queued(f"j{i}", replicas=8, seconds=800.0, submitted=i) for i in range(8)]
    plan = create_allocation_plan(crowd, TWO_NODES, [], now=0.0)
    assert len(plan.starts) == 8 and all(s.replicas == 1 for s in plan.starts)


def test_leftover_gpus_widen_a_starting_job():
    running = [RunningJob("r", ((0, 0),), expected_end=10_000.0)]
    queue = [queued("a", replicas=4, seconds=30.0)]
    start = _starts(create_allocation_plan(queue, ONE_NODE, running, now=0.0))["a"]
    assert start.replicas == 3 and start.expected_end == 10.0


def test_affinity_prefers_gpus_that_ran_the_same_model():
    warm = {(1, 2): "llama", (0, 0): "other"}
    plan = create_allocation_plan([queued("a", model="llama")], TWO_NODES, [], now=0.0, warm=warm)
    start = _starts(plan)["a"]
    assert start.devices == ((1, 2),) and start.warm
    cold = create_allocation_plan([queued("a", model="llama")], TWO_NODES, [], now=0.0, warm=warm,
                                  options=PolicyOptions(affinity=False))
    assert _starts(cold)["a"].devices != ((1, 2),)


def test_a_retried_job_goes_off_the_devices_it_failed_on_where_there_is_room():
    from dataclasses import replace

    failed_on = ((1, 2), (1, 3))
    warm = {device: "llama" for device in failed_on}  # even where affinity would pull it back
    job = queued("a", model="llama", tp=2)
    retry = replace(job, demand=replace(job.demand, avoid=failed_on))
    assert _starts(create_allocation_plan([job], TWO_NODES, [], 0.0, warm=warm))["a"].devices == failed_on
    elsewhere = _starts(create_allocation_plan([retry], TWO_NODES, [], 0.0, warm=warm))["a"].devices
    assert len(elsewhere) == 2 and not set(elsewhere) & set(failed_on)
    # no room elsewhere: the same devices rather than waiting
    running = [RunningJob("r", tuple((n, g) for n in (0, 1) for g in range(4) if (n, g) not in failed_on), 10_000.0)]
    assert _starts(create_allocation_plan([retry], TWO_NODES, running, 0.0))["a"].devices == failed_on


def test_quarantined_gpus_are_never_used():
    quarantined = {(0, 0), (0, 1), (0, 2)}
    plan = create_allocation_plan([queued("a"), queued("b", submitted=1.0)], ONE_NODE, [], 0.0,
                                  quarantined=quarantined)
    assert [s.devices for s in plan.starts] == [((0, 3),)]
    blocked = create_allocation_plan([queued("big", tp=4)], ONE_NODE, [], 0.0, quarantined={(0, 0)})
    assert blocked.starts == () and blocked.reservation is None
    assert "quarantined" in blocked.waiting["big"]


def test_preemption_stops_lower_classes_for_a_long_waiting_high_job():
    running = [
        RunningJob("low1", ((0, 0), (0, 1)), expected_end=5000.0, priority="low"),
        RunningJob("normal1", ((0, 2),), expected_end=6000.0, priority="normal"),
        RunningJob("pinned", ((0, 3),), expected_end=100.0, priority="low", preemptible=False),
    ]
    options = PolicyOptions(preemption=True, preempt_after_s=600.0)
    plan = create_allocation_plan([queued("vip", "high", tp=2)], ONE_NODE, running, 0.0, options=options)
    assert plan.preempt == ("low1",)
    assert plan.reservation.devices == {(0, 0), (0, 1)} and plan.reservation.start_at == 0.0
    patient = create_allocation_plan([queued("vip", "high", tp=2)], ONE_NODE, running, 0.0)
    assert patient.preempt == ()
    same_class = [RunningJob("h", ((0, 0), (0, 1), (0, 2), (0, 3)), expected_end=5000.0, priority="high")]
    assert create_allocation_plan([queued("vip", "high", tp=2)], ONE_NODE, same_class, 0.0,
                                  options=options).preempt == ()


def test_a_running_job_past_its_estimate_is_not_treated_as_free():
    running = [RunningJob("late", ((0, 0), (0, 1), (0, 2), (0, 3)), expected_end=50.0)]
    plan = create_allocation_plan([queued("a", replicas=4)], ONE_NODE, running, now=100.0)
    assert plan.starts == () and plan.reservation.start_at == 160.0


def test_cpu_slots_are_single_devices():
    from evalfleet.orchestrator.demand import slot_inventory

    slots = slot_inventory(3, memory_gb=16)
    queue = [queued(f"j{i}", submitted=i) for i in range(5)]
    plan = create_allocation_plan(queue, slots, [], now=0.0)
    assert sorted(d for s in plan.starts for d in s.devices) == [(0, 0), (0, 1), (0, 2)]
    assert [s.job_id for s in plan.starts] == ["j0", "j1", "j2"]


def test_the_plan_is_a_pure_function_of_its_inputs():
    queue = [queued(f"j{i}", ["high", "normal", "low"][i % 3], submitted=i, replicas=1 + i % 3, seconds=50 * i + 10)
             for i in range(12)]
    running = [RunningJob("r", ((1, 1),), 70.0)]
    first = create_allocation_plan(queue, TWO_NODES, running, 5.0, warm={(0, 1): "m"})
    second = create_allocation_plan(list(reversed(queue)), TWO_NODES, running, 5.0, warm={(0, 1): "m"})
    assert first == second


def test_queued_job_is_frozen_data():
    job = QueuedJob("a", demand())
    assert job == QueuedJob("a", demand())
