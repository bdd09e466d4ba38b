"""What communication timing costs: a tp=2 group computing the same batches with the timer on
every batch, on one batch in 20 (the default), and off, side by side in one run.

The timer wraps torch.distributed's collectives and (on CUDA) syncs the device around each
one; sampling one batch in N leaves the other batches unwrapped. The overhead is each
setting's seconds per batch against timing off, as a ratio; the target is <= 2% for the
default. Settings alternate within each round, and each setting's median round counts
(shared machines: a round that another process slowed down does not decide).
On the CPU there is no device sync to pay for, so these figures are a floor; on GPUs the
always-on cost is larger and the sampled one stays near 1/N of it.

    python benchmarks/communication_timing.py [--rounds 7] [--batches 12]

Writes benchmarks/results/communication_timing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from shapes import make_model  # noqa: E402

from evalfleet.runtime.backends.base import LoglikelihoodItem  # noqa: E402
from evalfleet.runtime.group import GroupSpec  # noqa: E402
from evalfleet.runtime.workers import COMMUNICATION_SAMPLE_EVERY, WorkerGroupRunner  # noqa: E402

SETTINGS = {"every batch": 1, f"1 in {COMMUNICATION_SAMPLE_EVERY} (default)": COMMUNICATION_SAMPLE_EVERY, "off": 0}


def make_batches(count: int, vocab: int) -> list[list[LoglikelihoodItem]]:
    rng = random.Random(11)
    return [[LoglikelihoodItem(tuple(rng.randrange(2, vocab) for _ in range(rng.randint(40, 120))),
                               tuple(rng.randrange(2, vocab) for _ in range(4))) for _ in range(8)]
            for _ in range(count)]


def time_batches(runner: WorkerGroupRunner, batches: list) -> float:
    started = time.perf_counter()
    runner.run(batches, lambda index, results: None)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=12)
    args = parser.parse_args()
    import torch

    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    with tempfile.TemporaryDirectory(prefix="evalfleet-bench-comm-") as tmp:
        model = make_model(Path(tmp) / "model", "small")
        runners = {}
        for name, every in SETTINGS.items():
            spec = GroupSpec(str(model), dtype="float32", device="cpu", tp=2, threads=threads,
                             time_communication=every > 0)
            runners[name] = WorkerGroupRunner(spec, [["cpu", "cpu"]], time_every=max(every, 1)).start()
        try:
            from transformers import AutoConfig

            vocab = AutoConfig.from_pretrained(model).vocab_size
            batches = make_batches(args.batches, vocab)
            for runner in runners.values():  # warm up: first-call costs are not timing's
                time_batches(runner, batches[:2])
            rounds: dict[str, list[float]] = {name: [] for name in SETTINGS}
            for round_ in range(args.rounds):
                for name, runner in runners.items():
                    seconds = time_batches(runner, batches) / len(batches)
                    rounds[name].append(seconds)
                    print(f"round {round_ + 1} {name:16s} {seconds * 1000:8.2f} ms/batch", flush=True)
            timed = {name: runner.describe()["communication"] for name, runner in runners.items()}
        finally:
            for runner in runners.values():
                runner.close()
    best = {name: statistics.median(values) for name, values in rounds.items()}
    off = best["off"]
    overhead = {name: round(seconds / off - 1, 4) for name, seconds in best.items() if name != "off"}
    default = f"1 in {COMMUNICATION_SAMPLE_EVERY} (default)"
    document = {
        "benchmark": f"communication timing on a tp=2 CPU group, {args.batches} batches of 8 log-likelihood rows",
        "model": "random Llama, hidden 256, 4 layers (shapes.make_model, shape 'small')",
        "machine": {"cpu_cores": len(os.sched_getaffinity(0)), "threads_per_rank": threads, "torch": torch.__version__},
        "seconds_per_batch": {name: round(seconds, 6) for name, seconds in best.items()},
        "overhead_vs_off": overhead,
        "communication_share_measured": {name: figures["share"] for name, figures in timed.items() if name != "off"},
        "timed_batches": {name: figures["timed_batches"] for name, figures in timed.items()},
        "rounds": {name: [round(v, 6) for v in values] for name, values in rounds.items()},
        "target": "the default sampling costs <= 2% against timing off",
    }
    document["target_met"] = overhead[default] <= 0.02
    out = ROOT / "results" / "communication_timing.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document["overhead_vs_off"]), "->", out)


if __name__ == "__main__":
    main()
