"""Properties of the policy on random pools, queues and running jobs (hypothesis)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sample_jobs import demand

from evalfleet.orchestrator.policy import PolicyOptions, QueuedJob, RunningJob, create_allocation_plan
from evalfleet.planning import Inventory


@st.composite
def scenarios(draw):
    nodes = draw(st.integers(1, 3))
    per_node = draw(st.sampled_from([1, 2, 4, 8]))
    inventory = Inventory.from_spec(f"{nodes}x{per_node}xH100-80GB")
    devices = [(n, g) for n in range(nodes) for g in range(per_node)]
    now = draw(st.floats(0, 1000))
    taken = draw(st.lists(st.sampled_from(devices), unique=True, max_size=len(devices)))
    running, cursor = [], 0
    while cursor < len(taken):
        size = draw(st.integers(1, 4))
        chunk = tuple(taken[cursor:cursor + size])
        cursor += size
        resizable = draw(st.booleans())  # one replica per device, and room to grow
        need = demand(replicas=draw(st.integers(len(chunk), 6)), min_replicas=draw(st.integers(1, len(chunk))),
                      seconds=draw(st.floats(1, 5000)), startup=draw(st.floats(0, 100))) if resizable else None
        leaving = chunk[-1:] if resizable and len(chunk) > 1 and draw(st.booleans()) else ()
        running.append(RunningJob(
            f"run{len(running)}", chunk, expected_end=draw(st.floats(0, 3000)),
            priority=draw(st.sampled_from(["high", "normal", "low"])), preemptible=draw(st.booleans()),
            demand=need, resizable=resizable, leaving=leaving, load_s=draw(st.sampled_from([None, 5.0, 500.0])),
        ))
    rest = [d for d in devices if d not in taken]
    quarantined = draw(st.lists(st.sampled_from(rest), unique=True, max_size=2)) if rest else []
    queue = []
    for index in range(draw(st.integers(1, 10))):
        replicas = draw(st.integers(1, 4))
        queue.append(QueuedJob(
            f"job{index}",
            demand(
                model=draw(st.sampled_from(["a", "b"])), tp=draw(st.sampled_from([1, 2, 4])),
                pp=draw(st.sampled_from([1, 1, 2])), replicas=replicas,
                min_replicas=draw(st.integers(1, replicas)), seconds=draw(st.floats(1, 5000)),
                startup=draw(st.floats(0, 100)),
            ),
            draw(st.sampled_from(["high", "normal", "low"])), draw(st.floats(0, 1000)),
            draw(st.sampled_from([0.0, 0.0, 2000.0])),
        ))
    warm = {d: draw(st.sampled_from(["a", "b"])) for d in draw(st.lists(st.sampled_from(devices), unique=True))}
    options = PolicyOptions(
        aging_s=draw(st.sampled_from([60.0, 3600.0])), backfill=draw(st.booleans()), elastic=draw(st.booleans()),
        affinity=draw(st.booleans()), preemption=draw(st.booleans()),
        preempt_after_s=draw(st.sampled_from([0.0, 500.0])), resize=draw(st.booleans()),
    )
    return inventory, queue, running, now, set(quarantined), warm, options


def _assumed_end(job: RunningJob, now: float) -> float:
    return job.expected_end if job.expected_end > now else now + max(60.0, now - job.expected_end)


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(scenarios())
def test_never_over_allocates_and_always_places_whole_gangs(scenario):
    inventory, queue, running, now, quarantined, warm, options = scenario
    plan = create_allocation_plan(queue, inventory, running, now, options=options, quarantined=quarantined, warm=warm)
    jobs = {j.id: j for j in queue}
    held = [d for r in running for d in r.devices] + list(quarantined)
    used = [d for s in plan.starts for d in s.devices]
    assert len(used) == len(set(used)), "a GPU was given to two starting jobs"
    assert not set(used) & set(held), "a GPU that is busy or quarantined was given out"
    grown = [d for g in plan.grows for d in g.devices]
    assert len(grown) == len(set(grown)) and not set(grown) & (set(used) | set(held)), "a grown replica's GPU was taken"
    by_id = {r.id: r for r in running}
    for job_id in {g.job_id for g in plan.grows}:
        job = by_id[job_id]
        assert job.resizable and not job.leaving and options.resize
        assert job.replicas + sum(g.job_id == job_id for g in plan.grows) <= job.demand.max_replicas
    for shrink in plan.shrinks:
        donor = by_id[shrink.job_id]
        assert donor.resizable and set(shrink.devices) <= set(donor.devices) - set(donor.leaving)
        given = sum(s.job_id == donor.id for s in plan.shrinks)
        assert donor.replicas - given >= donor.demand.min_replicas, "a job was shrunk below its fewest replicas"
    assert len({s.job_id for s in plan.starts}) == len(plan.starts)
    for start in plan.starts:
        job = jobs[start.job_id]
        need = job.demand
        assert job.not_before <= now
        assert need.min_replicas <= start.replicas <= need.max_replicas
        assert len(start.devices) == start.replicas * need.replica_gpus
        for i in range(0, len(start.devices), need.tp):
            assert len({node for node, _ in start.devices[i:i + need.tp]}) == 1, "a tp group spans nodes"
    assert set(plan.preempt) <= {r.id for r in running if r.preemptible}


@SETTINGS
@given(scenarios())
def test_backfill_never_delays_the_reserved_job(scenario):
    inventory, queue, running, now, quarantined, warm, options = scenario
    plan = create_allocation_plan(queue, inventory, running, now, options=options, quarantined=quarantined, warm=warm)
    reservation = plan.reservation
    if reservation is None:
        return
    assert reservation.job_id not in {s.job_id for s in plan.starts}
    assert not reservation.devices & quarantined
    for start in plan.starts:
        if set(start.devices) & reservation.devices:
            assert start.expected_end <= reservation.start_at, f"{start.job_id} holds reserved GPUs too long"
    given_back = {d for shrink in plan.shrinks for d in shrink.devices}
    for job in running:  # a replica leaving or given back frees its devices at once; others must end first
        kept = set(job.devices) - set(job.leaving) - given_back
        if kept & reservation.devices and job.id not in plan.preempt:
            assert _assumed_end(job, now) <= reservation.start_at


@SETTINGS
@given(scenarios())
def test_same_inputs_same_plan(scenario):
    inventory, queue, running, now, quarantined, warm, options = scenario
    first = create_allocation_plan(queue, inventory, running, now, options=options, quarantined=quarantined, warm=warm)
    again = create_allocation_plan(list(reversed(queue)), inventory, list(reversed(running)), now, options=options,
                                   quarantined=set(quarantined), warm=dict(warm))
    assert first == again
