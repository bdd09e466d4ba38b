"""Scheduling benchmark: evalfleet's policy against the usual ways of running many evaluations.

Simulates a 500-job seeded trace (models 1B-180B, tasks of 1e6-1e8 tokens, three priority
classes, injected crashes) on 8 nodes x 8 H100-80GB, under:

- evalfleet's policy (priorities with aging, gangs, EASY backfill, elastic data parallelism
  with live width: running jobs widen onto idle GPUs and give replicas back to higher classes,
  model affinity), the same with preemption, and the same with each job's width fixed at its
  start (`--no-resize`);
- FIFO where each job takes the whole pool (lm-eval launched data-parallel over every GPU);
- FIFO with a fixed 8 GPUs per job (OpenCompass-style partitioning).

Every policy runs the same jobs with the same runtime model: a job's speed on k replicas is
the planner's tokens/s estimate for that layout, plus a start-up cost (process and task
set-up, then weights read from storage, faster when the node already has them). The policy
sees estimates; the true work differs by a seeded log-normal factor.

Robustness: the same trace again with every estimate the policy sees off by 50%, all too low,
all too high, and each job's too low or too high at random (seeded), while the true work stays
the same; for each, evalfleet's policy (without and with preemption) is scored as above and
against its own run on the unbiased estimates (makespan change, high-priority wait, and how
many jobs start in a different order).

    python benchmarks/scheduling.py [--json] [--jobs 500] [--seed 0]

Writes benchmarks/results/scheduling.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

from evalfleet.orchestrator import demand as runtime_model
from evalfleet.orchestrator.baselines import fifo_fixed, fifo_whole_pool
from evalfleet.orchestrator.policy import PolicyOptions, create_allocation_plan
from evalfleet.orchestrator.simulator import SimulationReport, simulate
from evalfleet.orchestrator.workload import TraceJob, synthetic_trace
from evalfleet.planning import Inventory

RESULTS = Path(__file__).parent / "results" / "scheduling.json"
TARGETS = {"makespan_over_lower_bound": 1.15, "speedup_vs_fifo_whole_pool": 2.0, "high_over_low_p95_wait": 0.10}


def _policies(fixed_gpus: int) -> dict:
    return {
        "evalfleet": functools.partial(create_allocation_plan, options=PolicyOptions()),
        "evalfleet_preemption": functools.partial(
            create_allocation_plan, options=PolicyOptions(preemption=True, preempt_after_s=300.0)
        ),
        "evalfleet_fixed_width": functools.partial(create_allocation_plan, options=PolicyOptions(resize=False)),
        "fifo_whole_pool": fifo_whole_pool,
        f"fifo_fixed_{fixed_gpus}": fifo_fixed(fixed_gpus),
    }


def _summary(reports: dict[str, SimulationReport], fixed_gpus: int) -> dict:
    ours = reports["evalfleet"]
    waits = {p: round(s.p95_wait_s, 1) for p, s in ours.per_priority.items()}
    return {
        "makespan_over_lower_bound": round(ours.makespan_over_lower_bound, 4),
        "speedup_vs_fifo_whole_pool": round(reports["fifo_whole_pool"].makespan_s / ours.makespan_s, 3),
        "speedup_vs_fifo_fixed": round(reports[f"fifo_fixed_{fixed_gpus}"].makespan_s / ours.makespan_s, 3),
        "p95_wait_s": waits,
        "high_over_low_p95_wait": round(waits["high"] / waits["low"], 4) if waits["low"] else 0.0,
    }


def run(jobs: int, seed: int, cluster: str, work_tokens: tuple[float, float], fixed_gpus: int = 8) -> dict:
    inventory = Inventory.from_spec(cluster)
    trace = synthetic_trace(inventory, jobs=jobs, seed=seed, arrival_window_s=3600.0, work_tokens=work_tokens)
    reports, seconds = {}, {}
    for name, policy in _policies(fixed_gpus).items():
        began = time.perf_counter()
        reports[name] = simulate(trace, inventory, policy)
        seconds[name] = round(time.perf_counter() - began, 2)
    return {
        **_summary(reports, fixed_gpus),
        "policies": {
            name: {**report.to_dict(), "simulation_wall_s": seconds[name]} for name, report in reports.items()
        },
    }


MISESTIMATES: dict[str, Callable[[random.Random], float]] = {
    "all_estimates_50pct_low": lambda rng: 0.5,
    "all_estimates_50pct_high": lambda rng: 1.5,
    "each_estimate_50pct_low_or_high": lambda rng: rng.choice((0.5, 1.5)),
}


def misestimated(trace: list[TraceJob], factor: Callable[[random.Random], float], seed: int) -> list[TraceJob]:
    """The trace with each job's estimated work (what the policy sees) scaled; its true work kept."""
    rng = random.Random(seed)
    return [dataclasses.replace(job, demand=job.demand.with_work(job.demand.work_tokens * factor(rng))) for job in trace]


def start_order(trace: list[TraceJob], inventory: Inventory, policy) -> list[str]:
    """Job ids in the order the policy first started them."""
    started: dict[str, None] = {}

    def watching(*args, **kwargs):
        decision = policy(*args, **kwargs)
        for start in decision.starts:
            started.setdefault(start.job_id, None)
        return decision

    simulate(trace, inventory, watching)
    return list(started)


def robustness(jobs: int, seed: int, cluster: str, work_tokens: tuple[float, float]) -> dict:
    """How the policy's outcome and decisions move when every estimate it sees is off by 50%."""
    inventory = Inventory.from_spec(cluster)
    trace = synthetic_trace(inventory, jobs=jobs, seed=seed, arrival_window_s=3600.0, work_tokens=work_tokens)
    policies = {name: p for name, p in _policies(8).items() if name.startswith("evalfleet")}
    document: dict = {}
    for name, policy in policies.items():
        accurate = simulate(trace, inventory, policy)
        rank = {job: i for i, job in enumerate(start_order(trace, inventory, policy))}
        rows = {}
        for case, factor in MISESTIMATES.items():
            biased = misestimated(trace, factor, seed)
            report = simulate(biased, inventory, policy)
            moved = start_order(biased, inventory, policy)
            rows[case] = {
                "makespan_over_lower_bound": round(report.makespan_over_lower_bound, 4),
                "makespan_change": round(report.makespan_s / accurate.makespan_s - 1, 4),
                "high_p95_wait_s": round(report.per_priority["high"].p95_wait_s, 1),
                "high_over_low_p95_wait": round(
                    report.per_priority["high"].p95_wait_s / report.per_priority["low"].p95_wait_s, 4),
                "preemptions": report.preemptions,
                "jobs_started_in_another_place": sum(rank[job] != i for i, job in enumerate(moved)),
                "mean_start_rank_shift": round(sum(abs(rank[job] - i) for i, job in enumerate(moved)) / len(moved), 2),
            }
        document[name] = {
            "accurate": {"makespan_over_lower_bound": round(accurate.makespan_over_lower_bound, 4),
                         "high_p95_wait_s": round(accurate.per_priority["high"].p95_wait_s, 1),
                         "preemptions": accurate.preemptions},
            **rows,
        }
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the JSON document instead of a table")
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cluster", default="8x8xH100-80GB")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    main_run = run(args.jobs, args.seed, args.cluster, (1e6, 1e8))
    larger = run(args.jobs, args.seed, args.cluster, (3e6, 3e8))
    document = {
        "benchmark": "scheduling",
        "cluster": args.cluster,
        "jobs": args.jobs,
        "seed": args.seed,
        "workload": {
            "arrival": "Poisson over the first hour", "work_tokens": [1e6, 1e8], "estimate_error_sigma": 0.15,
            "failure_rate_per_attempt": 0.03, "priorities": {"high": 0.15, "normal": 0.6, "low": 0.25},
        },
        "runtime_model": {
            "speed": "planner estimated_tokens_per_s for (tp, pp, dp=k)",
            "process_start_s": runtime_model.PROCESS_START_S,
            "cold_read_gb_per_s": runtime_model.COLD_READ_BYTES_PER_S / 1e9,
            "warm_read_gb_per_s": runtime_model.WARM_READ_BYTES_PER_S / 1e9,
        },
        **{k: v for k, v in main_run.items() if k != "policies"},
        "targets": TARGETS,
        "targets_met": {
            key: main_run[key] >= goal if key.startswith("speedup") else main_run[key] <= goal
            for key, goal in TARGETS.items()
        },
        "policies": main_run["policies"],
        "sensitivity_larger_tasks": {"work_tokens": [3e6, 3e8],
                                     **{k: v for k, v in larger.items() if k != "policies"}},
        "robustness_to_estimates_off_by_50pct": robustness(args.jobs, args.seed, args.cluster, (1e6, 1e8)),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    print(f"{args.jobs} jobs on {args.cluster} (seed {args.seed})")
    print(f"{'policy':24} {'makespan h':>10} {'/ bound':>8} {'util':>6} {'p95 wait h/n/l (min)':>24}")
    for name, report in main_run["policies"].items():
        waits = "/".join(f"{report['per_priority'][p]['p95_wait_s'] / 60:.0f}" for p in ("high", "normal", "low"))
        print(f"{name:24} {report['makespan_s'] / 3600:10.2f} {report['makespan_over_lower_bound']:8.3f} "
              f"{report['gpu_utilization']:6.2f} {waits:>24}")
    for key in ("speedup_vs_fifo_whole_pool", "speedup_vs_fifo_fixed", "high_over_low_p95_wait"):
        print(f"{key}: {document[key]}")
    print(f"larger tasks: {document['sensitivity_larger_tasks']}")
    for name, rows in document["robustness_to_estimates_off_by_50pct"].items():
        for case, row in rows.items():
            print(f"{name} {case}: {row}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
