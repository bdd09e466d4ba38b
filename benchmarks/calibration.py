"""Predicted against measured compute time, before and after one calibration run.

For each CPU layout of benchmarks/distributed_cpu.py (single, dp=2, tp=2, pp=2) on the same
random Llama (hidden 256, 4 layers), one request with `bench_mc` (log-likelihood) and
`demo_arith` (generation) runs twice against an empty calibration file:

- round 1: the estimate is the cost model's (`modeled`); the run then records its speeds;
- round 2: the estimate uses the speeds round 1 measured (`measured`).

Each round prints predicted / measured compute seconds (the runner's time, `timing.by_kind`),
per kind and in all; the target is every round-2 ratio within 0.5-2x. Round 1's ratios are
the cost model's own error, reported as they are. Writes benchmarks/results/calibration.json.

    python benchmarks/calibration.py [--docs 300] [--layouts single,dp=2,tp=2,pp=2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from distributed_cpu import LAYOUTS  # noqa: E402
from shapes import make_model, make_tasks  # noqa: E402


def run_round(model: Path, include: Path, name: str) -> dict:
    from evalfleet.engines.distributed import DistributedEvaluationEngine
    from evalfleet.engines.lightweight import LightweightEvaluationEngine
    from evalfleet.orchestrator.demand import estimate_for
    from evalfleet.planning import Inventory
    from evalfleet.types import EvaluationRequest

    hints = {key: value for key, value in LAYOUTS[name].items() if key != "engine"}
    request = EvaluationRequest.model_validate({
        "model": {"path": str(model), "dtype": "float32", "device": "cpu"},
        "tasks": {"names": ["bench_mc", "demo_arith"], "include_path": str(include)},
        "use_cache": False,
        **hints,
    })
    estimate, size = estimate_for(request, Inventory.cpu())
    engine = LightweightEvaluationEngine() if LAYOUTS[name]["engine"] == "lightweight" else DistributedEvaluationEngine()
    result = asyncio.run(engine.evaluate(request))
    engine.optimize_memory()
    measured = result.evalfleet["timing"]["by_kind"]
    work = size["work_tokens_by_kind"]
    kinds = {}
    for kind, figures in measured.items():
        predicted = work[kind] / estimate["by_kind"][kind]["tokens_per_s"]
        kinds[kind] = {
            "source": estimate["by_kind"][kind]["source"],
            "predicted_seconds": round(predicted, 3),
            "measured_seconds": figures["seconds"],
            "predicted_over_measured": round(predicted / figures["seconds"], 3),
            "counted_tokens": work[kind],
            "computed_tokens": figures["tokens"],
        }
    seconds = sum(figures["seconds"] for figures in measured.values())
    return {
        "source": estimate["source"],
        "predicted_seconds": estimate["seconds"],
        "measured_seconds": round(seconds, 3),
        "predicted_over_measured": round(estimate["seconds"] / seconds, 3),
        "by_kind": kinds,
        "key": estimate["key"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=300, help="bench_mc documents (4 requests each)")
    parser.add_argument("--layouts", default="single,dp=2,tp=2,pp=2")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cases = {}
    with tempfile.TemporaryDirectory(prefix="evalfleet-bench-calibration-") as tmp:
        folder = Path(tmp)
        os.environ["EVALFLEET_CALIBRATION"] = str(folder / "calibration.sqlite")
        os.environ["EVALFLEET_SIZES"] = str(folder / "sizes")
        (folder / "tasks").mkdir()
        make_tasks(folder / "tasks", args.docs, compute_docs=1)
        model = make_model(folder / "model", "small")
        for name in args.layouts.split(","):
            rounds = [run_round(model, folder / "tasks", name) for _ in range(2)]
            cases[name] = {"uncalibrated": rounds[0], "calibrated": rounds[1]}
            print(f"{name:8s} modeled {rounds[0]['predicted_over_measured']:6.2f}x   "
                  f"after one run {rounds[1]['predicted_over_measured']:5.2f}x  "
                  + "  ".join(f"{k} {v['predicted_over_measured']:.2f}x" for k, v in rounds[1]["by_kind"].items()),
                  flush=True)
    ratios = [kind["predicted_over_measured"] for case in cases.values() for kind in case["calibrated"]["by_kind"].values()]
    ratios += [case["calibrated"]["predicted_over_measured"] for case in cases.values()]
    document = {
        "benchmark": "predicted over measured compute seconds, per CPU layout, before and after one calibration run",
        "model": "random Llama, hidden 256, 4 layers",
        "tasks": ["bench_mc", "demo_arith"],
        "machine": {"cpu_cores": len(os.sched_getaffinity(0)), "torch": torch.__version__},
        "cases": cases,
        "target": "every calibrated ratio within 0.5-2x",
        "target_met": all(0.5 <= r <= 2.0 for r in ratios),
    }
    out = ROOT / "results" / "calibration.json"
    out.write_text(json.dumps(document, indent=2) + "\n")
    print("target met" if document["target_met"] else "target missed", "->", out)


if __name__ == "__main__":
    main()
