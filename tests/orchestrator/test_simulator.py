"""The simulator: deterministic, sane, and fair to the baselines."""

from __future__ import annotations

import functools

import pytest

from evalfleet.orchestrator.baselines import fifo_fixed, fifo_whole_pool
from evalfleet.orchestrator.policy import PolicyOptions, create_allocation_plan
from evalfleet.orchestrator.simulator import lower_bound, percentile, simulate
from evalfleet.orchestrator.workload import TraceJob, model_demands, synthetic_trace
from evalfleet.planning import Inventory

CLUSTER = Inventory.from_spec("2x8xH100-80GB")
OURS = functools.partial(create_allocation_plan, options=PolicyOptions())


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace(CLUSTER, jobs=60, seed=3, arrival_window_s=1800.0, work_tokens=(1e6, 3e7),
                           failure_rate=0.1)


def test_same_seed_same_trace_and_same_result(trace):
    again = synthetic_trace(CLUSTER, jobs=60, seed=3, arrival_window_s=1800.0, work_tokens=(1e6, 3e7),
                            failure_rate=0.1)
    assert again == trace
    assert simulate(trace, CLUSTER, OURS) == simulate(again, CLUSTER, OURS)
    other = synthetic_trace(CLUSTER, jobs=60, seed=4, arrival_window_s=1800.0, work_tokens=(1e6, 3e7))
    assert other != trace


def test_trace_covers_sizes_priorities_and_failures(trace):
    models = {job.demand.model for job in trace}
    assert len(models) >= 5
    assert {job.priority for job in trace} == {"high", "normal", "low"}
    assert any(job.failures for job in trace)
    assert all(b.arrival >= a.arrival for a, b in zip(trace, trace[1:], strict=False))
    sizes = [d.replica_gpus for d, _ in model_demands(CLUSTER)]
    assert min(sizes) == 1 and max(sizes) == 8


def test_every_job_finishes_and_the_figures_are_consistent(trace):
    report = simulate(trace, CLUSTER, OURS)
    assert report.unfinished == 0
    assert sum(s.jobs for s in report.per_priority.values()) + report.failed_jobs == len(trace)
    assert report.makespan_s >= report.lower_bound_s > 0
    assert 0 < report.gpu_utilization <= 1.0
    assert report.failures >= sum(1 for job in trace if job.failures)
    assert report.starts == len(trace) + report.failures + report.preemptions - report.failed_jobs
    for stats in report.per_priority.values():
        assert stats.p95_wait_s <= stats.p95_completion_s
        assert 0 <= stats.mean_wait_s <= stats.mean_completion_s


def test_our_policy_beats_both_baselines_and_serves_high_priority_first(trace):
    ours = simulate(trace, CLUSTER, OURS)
    whole = simulate(trace, CLUSTER, fifo_whole_pool)
    fixed = simulate(trace, CLUSTER, fifo_fixed(8))
    assert ours.makespan_s < whole.makespan_s and ours.makespan_s < fixed.makespan_s
    assert ours.per_priority["high"].mean_wait_s < ours.per_priority["low"].mean_wait_s


def test_whole_pool_runs_one_job_at_a_time(trace):
    concurrent = []

    def watched(queue, inventory, running, now, **kwargs):
        plan = fifo_whole_pool(queue, inventory, running, now, **kwargs)
        concurrent.append(len(running) + len(plan.starts))
        return plan

    report = simulate(trace[:15], CLUSTER, watched)
    assert report.unfinished == 0 and max(concurrent) == 1


def test_preemption_in_simulation_resumes_work():
    options = PolicyOptions(preemption=True, preempt_after_s=0.0)
    demands = dict((d.model, d) for d, _ in model_demands(CLUSTER))
    big = demands["tiiuae/falcon-180B"]
    small = demands["meta-llama/Llama-3.1-8B"]
    trace = [TraceJob(f"low{i}", 0.0, "low", small.with_work(2e8), 2e8) for i in range(16)]
    trace.append(TraceJob("vip", 10.0, "high", big.with_work(1e7), 1e7))
    report = simulate(trace, CLUSTER, functools.partial(create_allocation_plan, options=options))
    assert report.preemptions >= 1 and report.unfinished == 0
    assert report.per_priority["high"].mean_wait_s == 0.0


def test_lower_bound_and_percentile():
    assert percentile([], 95) == 0.0
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([0, 10], 95) == pytest.approx(9.5)
    demands = model_demands(CLUSTER)
    small = demands[0][0]
    job = TraceJob("a", 100.0, "normal", small.with_work(1e9), 1e9)
    fastest = min(small.with_work(1e9).runtime(k, warm=True) for k in range(1, small.max_replicas + 1))
    assert lower_bound([job], 16) >= fastest


def test_live_width_follows_the_policy_and_keeps_the_accounting(trace):
    """A dp job that starts narrow widens when GPUs free up, and narrows for a high-priority arrival."""
    from sample_jobs import demand

    node = Inventory.from_spec("4xH100-80GB")
    elastic = demand("dp", replicas=4, seconds=4000.0, startup=60.0)
    small = TraceJob("blocker", 0.0, "normal", demand("b", replicas=1, seconds=300.0, startup=10.0), 300.0 * 1000)
    jobs = [TraceJob("big", 0.0, "normal", demand("b", tp=2, replicas=1, seconds=600.0, startup=10.0), 600.0 * 1000),
            small, TraceJob("dp", 1.0, "low", elastic, elastic.work_tokens),
            TraceJob("urgent", 900.0, "high", demand("u", tp=2, seconds=100.0, startup=10.0), 100.0 * 1000)]
    live = simulate(jobs, node, OURS)
    fixed = simulate(jobs, node, functools.partial(create_allocation_plan, options=PolicyOptions(resize=False)))
    assert live.unfinished == fixed.unfinished == 0
    assert live.grows >= 2 and live.shrinks >= 1 and fixed.grows == fixed.shrinks == 0
    assert live.per_priority["high"].mean_wait_s < fixed.per_priority["high"].mean_wait_s  # a replica given back
    assert live.makespan_s < fixed.makespan_s
    assert 0 < live.gpu_utilization <= 1.0
    # the whole trace too: every job ends, and each start is a first start, a retry or a resumption
    report = simulate(trace, CLUSTER, OURS)
    assert report.unfinished == 0
    assert report.starts == len(trace) + report.failures + report.preemptions - report.failed_jobs
