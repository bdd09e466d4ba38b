"""On one CUDA GPU: the lightweight engine against the distributed engine's worker path (tp=1).

Same model, tasks and dtype through both engines; prints one JSON document with each side's
load and evaluation time, requests/s, and how many per-sample results differ (the project's
tolerance: 1e-4 + 1e-5 x |value| for log-likelihoods, exact text for generations). Not part
of the test suite (no GPU there); run it where a GPU is:

    python scripts/gpu_distributed_check.py [--model demo] [--dtype float32] [--limit 50] [--out DIR]

Exit code 0 when every sample agrees, 1 when some differ, 2 without CUDA.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
LAYOUT_KEYS = ("strategy", "tp", "pp", "dp", "devices", "parallel_path")


def evaluate(engine, request) -> tuple[dict, float]:
    started = time.perf_counter()
    result = asyncio.run(engine.evaluate(request))
    return result.evalfleet, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tasks", default="demo_mc,demo_arith,demo_ppl")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--out", default=None, help="folder for the JSON figures (default: print only)")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2

    from samples import compare_samples, load_samples

    from evalfleet.engines.distributed import DistributedEvaluationEngine
    from evalfleet.engines.lightweight import LightweightEvaluationEngine
    from evalfleet.types import EvaluationRequest

    figures: dict = {"gpu": torch.cuda.get_device_name(0), "model": args.model, "dtype": args.dtype}
    with tempfile.TemporaryDirectory(prefix="evalfleet-gpu-check-") as tmp:
        samples = {}
        for name, engine, hints in (
            ("lightweight", LightweightEvaluationEngine(), {"engine": "lightweight"}),
            ("distributed_tp1", DistributedEvaluationEngine(), {"engine": "distributed", "tp": 1, "pp": 1, "dp": 1}),
        ):
            out = Path(tmp) / name
            request = EvaluationRequest.model_validate(
                {
                    "model": {"path": args.model, "dtype": args.dtype, "device": "cuda"},
                    "tasks": {"names": args.tasks, "limit": args.limit},
                    "output_dir": str(out),
                    "log_samples": True,
                    "use_cache": False,
                    **hints,
                }
            )
            section, total = evaluate(engine, request)
            engine.optimize_memory()
            timing = section["timing"]
            figures[name] = {
                "wall_with_load_seconds": round(total, 3),
                "evaluation_seconds": timing["wall_seconds"],
                "requests": timing["requests"],
                "requests_per_s": timing["requests_per_s"],
                "tokens_per_s": timing["tokens_per_s"],
                "layout": {k: section["layout"].get(k) for k in LAYOUT_KEYS},
            }
            samples[name] = load_samples(out)
        problems = compare_samples(samples["lightweight"], samples["distributed_tp1"])
    figures["differing_samples"] = len(problems)
    figures["first_differences"] = problems[:5]
    light, dist = figures["lightweight"], figures["distributed_tp1"]
    figures["distributed_over_lightweight_throughput"] = round(dist["requests_per_s"] / light["requests_per_s"], 3)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_distributed_check.json").write_text(text + "\n")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
