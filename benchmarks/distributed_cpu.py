"""The distributed engine on the CPU: one process with every core against tp=2, pp=2 and dp=2.

Task: `bench_mc` from shapes.py, 500 documents x 4 choices = 2,000 log-likelihood requests,
on the same random Llama (hidden 256, 4 layers). The single process is the lightweight engine
with torch using all cores (and, for scale, with one thread); worker ranks get cores // ranks
threads each (one on 2 cores). Throughput counts the evaluation only (`timing.wall_seconds`:
lm-eval, batching, compute); loading is reported apart. Layouts alternate over rounds and the
best round counts, since the machine is shared. tp and pp on a CPU are there to check
correctness at scale: their figures show the cost of splitting a model that fits, not a
speed-up. dp=2 gains over the single process only what torch's own threads leave on the
table: compare it with the one-thread run to see how well replicas scale.

    python benchmarks/distributed_cpu.py [--rounds 2] [--docs 500] [--model bench|demo]

Writes benchmarks/results/distributed_cpu.json (distributed_cpu_demo.json with --model demo).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from shapes import make_model, make_tasks  # noqa: E402

from evalfleet.types import DEMO_MODEL_DIR  # noqa: E402

LAYOUTS = {
    "single": {"engine": "lightweight"},
    "single, 1 thread": {"engine": "lightweight"},
    "dp=2": {"engine": "distributed", "strategy": "dp", "dp": 2},
    "tp=2": {"engine": "distributed", "strategy": "tp", "tp": 2},
    "pp=2": {"engine": "distributed", "strategy": "pp", "pp": 2},
}


def run_once(model: Path, include: Path, name: str, out: Path) -> dict:
    import torch

    from evalfleet.engines.distributed import DistributedEvaluationEngine
    from evalfleet.engines.lightweight import LightweightEvaluationEngine
    from evalfleet.types import EvaluationRequest

    hints = dict(LAYOUTS[name])
    request = EvaluationRequest.model_validate(
        {
            "model": {"path": str(model), "dtype": "float32", "device": "cpu"},
            "tasks": {"names": ["bench_mc"], "include_path": str(include)},
            "use_cache": False,
            "output_dir": str(out),
            **hints,
        }
    )
    engine = LightweightEvaluationEngine() if hints["engine"] == "lightweight" else DistributedEvaluationEngine()
    cores = torch.get_num_threads()
    torch.set_num_threads(1 if name.endswith("1 thread") else cores)
    started = time.perf_counter()
    try:
        result = asyncio.run(engine.evaluate(request))
    finally:
        torch.set_num_threads(cores)
    total = time.perf_counter() - started
    engine.optimize_memory()
    section = result.evalfleet
    timing = section["timing"]
    layout = section["layout"]
    return {
        "wall_seconds": timing["wall_seconds"],
        "wall_with_load_seconds": round(total, 3),
        "requests": timing["requests"],
        "requests_per_s": timing["requests_per_s"],
        "tokens_per_s": timing["tokens_per_s"],
        "threads_per_rank": layout.get("threads_per_rank"),
        "communication_share": layout.get("communication", {}).get("share"),
        "acc": result.metrics()["bench_mc"]["acc,none"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--docs", type=int, default=500)
    parser.add_argument("--model", choices=("bench", "demo"), default="bench",
                        help="bench: the random Llama of vs_lmeval.py (hidden 256); demo: the bundled 0.9M-parameter model")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    runs: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    with tempfile.TemporaryDirectory(prefix="evalfleet-bench-dist-") as tmp:
        folder = Path(tmp)
        (folder / "tasks").mkdir()
        make_tasks(folder / "tasks", args.docs, compute_docs=1)  # bench_mc is the task used here
        model = make_model(folder / "model", "small") if args.model == "bench" else DEMO_MODEL_DIR
        for round_ in range(args.rounds):
            for name in LAYOUTS:
                figures = run_once(model, folder / "tasks", name, folder / f"out-{name}-{round_}")
                runs[name].append(figures)
                print(f"round {round_ + 1} {name:16s} {figures['wall_seconds']:7.2f} s "
                      f"{figures['requests_per_s']:8.1f} req/s (load+eval {figures['wall_with_load_seconds']:.1f} s)",
                      flush=True)
    best = {name: min(rounds, key=lambda r: r["wall_seconds"]) for name, rounds in runs.items()}
    accuracies = {figures["acc"] for figures in best.values()}
    single = best["single"]["requests_per_s"]
    document = {
        "benchmark": "distributed engine on the CPU, 2,000 multiple-choice log-likelihood requests",
        "model": "random Llama, hidden 256, 4 layers" if args.model == "bench" else "bundled demo model, hidden 128, 4 layers",
        "machine": {"cpu_cores": cores, "torch": torch.__version__},
        "requests": best["single"]["requests"],
        "layouts": best,
        "speedup_vs_single": {name: round(figures["requests_per_s"] / single, 3) for name, figures in best.items()},
        "same_accuracy_everywhere": len(accuracies) == 1,
        "rounds": runs,
        "target": "dp=2 with one thread per replica >= 1.3x the single process using every core",
    }
    document["target_met"] = document["speedup_vs_single"]["dp=2"] >= 1.3
    out = ROOT / "results" / ("distributed_cpu.json" if args.model == "bench" else "distributed_cpu_demo.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document["speedup_vs_single"]), "->", out)


if __name__ == "__main__":
    main()
