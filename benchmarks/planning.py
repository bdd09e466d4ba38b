"""How long one plan takes: 10,000 (model, inventory) pairs, as the scheduler's simulator asks them.

Models are the shipped configs plus random ones; pools run from one GPU to 16 nodes of 8, with
random busy GPUs and GPU limits. Profiles are built once per model (as the scheduler does);
the timed part is `plan()` alone. Writes benchmarks/results/planning.json.

    .venv/bin/python benchmarks/planning.py [--pairs N] [--seed S]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

from evalfleet.planning import Inventory, plan, profile_model, shipped_models

RESULTS = Path(__file__).resolve().parent / "results" / "planning.json"
GPUS = ["A10G-24GB", "L4", "L40S", "A100-40GB", "A100-80GB", "H100-80GB", "H200", "B200"]


def random_config(rng: random.Random) -> dict:
    heads = rng.choice([16, 32, 40, 64, 96, 128])
    return {
        "model_type": rng.choice(["llama", "qwen2", "mistral"]),
        "hidden_size": heads * 128,
        "num_hidden_layers": rng.randint(16, 128),
        "num_attention_heads": heads,
        "num_key_value_heads": rng.choice([8, heads]),
        "intermediate_size": heads * 128 * rng.choice([3, 4]),
        "vocab_size": rng.choice([32000, 128256, 152064]),
        "max_position_embeddings": 8192,
    }


def random_pool(rng: random.Random) -> tuple[Inventory, set[tuple[int, int]], int | None]:
    nodes = rng.choice([1, 1, 2, 4, 8, 16])
    per_node = rng.choice([1, 2, 4, 8]) if nodes == 1 else 8
    inventory = Inventory.from_spec(f"{nodes}x{per_node}x{rng.choice(GPUS)}")
    devices = [(n, g) for n in range(nodes) for g in range(per_node)]
    busy = set(rng.sample(devices, rng.randint(0, len(devices) // 2)))
    max_gpus = rng.choice([None, 1, 2, 4, 8, 16])
    return inventory, busy, max_gpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    sources = sorted({str(path) for path in shipped_models().values()})
    profiles = [profile_model(source) for source in sources] + [profile_model(random_config(rng)) for _ in range(20)]
    pairs = [
        (rng.choice(profiles), *random_pool(rng), rng.choice(["bfloat16", "float16", "int8", "float32"]))
        for _ in range(args.pairs)
    ]

    timings, fits, alternatives = [], 0, 0
    gc.disable()  # as timeit does: collector pauses belong to the caller's heap, not to planning
    for profile, inventory, busy, max_gpus, dtype in pairs:
        start = time.perf_counter()
        result = plan(profile, inventory, dtype=dtype, busy=busy, max_gpus=max_gpus)
        timings.append(time.perf_counter() - start)
        fits += result.fits
        alternatives += len(result.alternatives)
    gc.enable()

    timings.sort()
    per_plan_ms = statistics.fmean(timings) * 1e3
    figures = {
        "benchmark": "planning",
        "pairs": len(pairs),
        "models": len(profiles),
        "ms_per_plan_mean": round(per_plan_ms, 4),
        "ms_per_plan_p50": round(timings[len(timings) // 2] * 1e3, 4),
        "ms_per_plan_p99": round(timings[int(len(timings) * 0.99)] * 1e3, 4),
        "ms_per_plan_max": round(timings[-1] * 1e3, 4),
        "seconds_total": round(sum(timings), 3),
        "fits_fraction": round(fits / len(pairs), 3),
        "alternatives_per_plan": round(alternatives / len(pairs), 2),
        "target_ms_per_plan": 1.0,
        "meets_target": per_plan_ms < 1.0,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
