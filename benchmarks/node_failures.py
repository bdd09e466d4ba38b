"""Node-failure benchmark: resuming from the request cache against restarting a job from zero.

The scheduling benchmark's 500-job trace on 8 nodes x 8 H100-80GB (64 GPUs), with a node lost
every N hours of simulated time (nodes in turn, each back after an hour). The jobs on a lost
node are requeued at once and placed on the nodes that remain, under evalfleet's policy, in two
ways:

- evalfleet: the job resumes from the request cache; only the batches in flight are lost;
- restart from zero: the job computes everything again (lm-eval's behaviour: no request cache).

Reported per N: GPU-hours of finished work lost, GPU-hours of repeated start-up, makespan over
the failure-free lower bound, and makespan against the same trace without failures.

    python benchmarks/node_failures.py [--jobs 500] [--seed 0] [--every 1,2,4]

Writes benchmarks/results/node_failures.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from evalfleet.orchestrator.policy import PolicyOptions, create_allocation_plan
from evalfleet.orchestrator.simulator import NodeFailures, simulate
from evalfleet.orchestrator.workload import synthetic_trace
from evalfleet.planning import Inventory

RESULTS = Path(__file__).parent / "results" / "node_failures.json"
CLUSTER = "8x8xH100-80GB"


def _figures(report) -> dict:
    return {
        "makespan_h": round(report.makespan_s / 3600, 3),
        "makespan_over_lower_bound": round(report.makespan_over_lower_bound, 4),
        "nodes_lost": report.nodes_lost,
        "jobs_hit": report.jobs_hit_by_node_loss,
        "lost_gpu_h": round(report.lost_gpu_s / 3600, 2),
        "restart_gpu_h": round(report.restart_gpu_s / 3600, 2),
        "failed_jobs": report.failed_jobs,
        "unfinished": report.unfinished,
    }


def run(jobs: int, seed: int, every_h: list[float], repair_h: float) -> dict:
    inventory = Inventory.from_spec(CLUSTER)
    trace = synthetic_trace(inventory, jobs=jobs, seed=seed, arrival_window_s=3600.0, work_tokens=(1e6, 1e8))
    policy = functools.partial(create_allocation_plan, options=PolicyOptions())
    clean = simulate(trace, inventory, policy)
    rows = {}
    for hours in every_h:
        row = {}
        for name, from_zero in (("evalfleet", False), ("restart_from_zero", True)):
            failures = NodeFailures(every_s=hours * 3600, repair_s=repair_h * 3600, restart_from_zero=from_zero)
            report = simulate(trace, inventory, policy, node_failures=failures)
            row[name] = _figures(report) | {"makespan_over_no_failures": round(report.makespan_s / clean.makespan_s, 4)}
        ours, baseline = row["evalfleet"], row["restart_from_zero"]
        row["lost_gpu_h_ratio"] = round(baseline["lost_gpu_h"] / ours["lost_gpu_h"], 2) if ours["lost_gpu_h"] else None
        row["makespan_ratio"] = round(baseline["makespan_h"] / ours["makespan_h"], 4)
        rows[f"every_{hours:g}h"] = row
    return {"no_failures": _figures(clean), "node_lost": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", default="1,2,4", help="hours between node losses, comma-separated")
    parser.add_argument("--repair", type=float, default=1.0, help="hours until a lost node is back")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    every = [float(part) for part in args.every.split(",")]
    document = {
        "benchmark": "node_failures", "cluster": CLUSTER, "jobs": args.jobs, "seed": args.seed,
        "repair_h": args.repair, "in_flight_s": NodeFailures(1.0).in_flight_s,
        **run(args.jobs, args.seed, every, args.repair),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
