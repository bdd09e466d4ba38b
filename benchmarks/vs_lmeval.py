"""evalfleet against lm-eval's own `hf` backend, same model, same tasks, alternating in one run.

Cases (tasks from benchmarks/shapes.py; generated data, random-weight Llamas with the demo tokenizer):
- `bench_mc` on the small model (hidden 256, 4 layers): 2,000 log-likelihood requests;
- `bench_hellaswag` and `bench_mmlu` (5-shot, `first_n`) on a ~7M-parameter model: compute-bound;
- `demo_arith` on the small model: greedy generation, stop at newline;
- `bench_chain` (benchmarks/chain.py): GSM8K's chain-of-thought shape, a 2-shot prompt shared by every
  question, answers of 1 to 10 steps ending at a blank line, on a small model trained to write them
  (once, then cached). Its generations are compared text by text (`same_generations`), and
  evalfleet's rows per decode step (continuous batching) are given.

Each side runs end to end in a fresh process of its own per round (spawned; as a user's run
does): the model load, lm-eval's task and request building, compute, scoring (the child's imports
come before its clock starts; `evalfleet --help` and `plan` start-up are measured as
subprocesses). One side running after the other in one process ran slower by the first's
leftovers (measured: evalfleet's bench_chain compute 2.6 s after lm-eval in the same process,
1.7 s alone, every operator slower); `--same-process` runs both in this one as before. Float32 on the CPU, evalfleet's result cache off, lm-eval at batch
size 16 (its `auto` only probes a GPU). Both sides keep their built requests (evalfleet's
default, lm-eval's `cache_requests=True`): `speedup` compares each side's best round (later rounds
reuse the requests on both sides), `speedup_first_round` the first, where both build them. Each side's wall time is split into start-up, request
building, compute and scoring, and the compute part's model-FLOPs utilization is given against
the machine's measured matmul peak. Writes benchmarks/results/vs_lmeval.json.

    python benchmarks/vs_lmeval.py [--rounds 3] [--docs 500] [--compute-docs 125] [--cases bench_mc,...] [--device cpu]
                                   [--backend vllm]

With `--backend vllm` a third side runs: evalfleet's vLLM backend, as `.venv-vllm/bin/evalfleet`
(`make vllm`) in its own process; its wall time is given with and without the engine's
start-up. Writes benchmarks/results/vs_lmeval_vllm.json then.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from chain import chain_model, make_chain_task  # noqa: E402
from shapes import compute_parameters, make_model, make_tasks, matmul_peak  # noqa: E402

CASES = {"bench_mc": "small", "bench_hellaswag": "7m", "bench_mmlu": "7m", "demo_arith": "small", "bench_chain": "chain"}
GENERATED: dict[str, dict[str, str]] = {}  # each side's last generations, prompt -> text
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@contextlib.contextmanager
def recording(cls, side: str):
    """Each generation `cls.generate_until` returns, by prompt, into GENERATED[side]."""
    original = cls.generate_until
    GENERATED[side] = {}

    def wrapper(self, requests, *args, **kwargs):
        texts = original(self, requests, *args, **kwargs)
        GENERATED[side].update((request.args[0], text) for request, text in zip(requests, texts, strict=True))
        return texts

    cls.generate_until = wrapper
    try:
        yield
    finally:
        cls.generate_until = original


@contextlib.contextmanager
def lm_eval_clock():
    """Times lm-eval's HFLM the way evalfleet's results.json does: forward passes are compute,
    its other time in the model before the last answer is request work, the rest is scoring."""
    from lm_eval.models.huggingface import HFLM

    clock = {"compute": 0.0, "first": None, "last": None}
    patched = {}

    def timed(name, on_compute):
        original = getattr(HFLM, name)

        def wrapper(self, *args, **kwargs):
            started = time.perf_counter()
            if not on_compute and clock["first"] is None:
                clock["first"] = started
            try:
                return original(self, *args, **kwargs)
            finally:
                if on_compute:
                    clock["compute"] += time.perf_counter() - started
                else:
                    clock["last"] = time.perf_counter()

        patched[name] = original
        setattr(HFLM, name, wrapper)

    for name in ("_model_call", "_model_generate"):
        timed(name, True)
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        timed(name, False)
    try:
        yield clock
    finally:
        for name, original in patched.items():
            setattr(HFLM, name, original)


def run_lm_eval(model: Path, task: str, include: Path, batch_size: int, device: str, dtype: str,
                built: Path) -> tuple[float, dict, dict]:
    """lm-eval with its own request cache (`cache_requests`) under `built`, as evalfleet keeps one:
    the first round builds requests on both sides, later rounds reuse them on both sides."""
    from lm_eval import simple_evaluate
    from lm_eval.caching import cache
    from lm_eval.models.huggingface import HFLM

    from evalfleet.tasks import build_task_manager

    manager = build_task_manager([task], str(include))
    cache.PATH = str(built)
    with recording(HFLM, "lm_eval"), lm_eval_clock() as clock:
        began = time.perf_counter()
        lm = HFLM(pretrained=str(model), dtype=dtype, batch_size=batch_size, device=device)
        started = time.perf_counter()
        out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, bootstrap_iters=0, cache_requests=True)
        finished = time.perf_counter()
    split = {
        "startup_seconds": started - began,
        "requests_seconds": max(0.0, clock["last"] - started - clock["compute"]),
        "compute_seconds": clock["compute"],
        "scoring_seconds": finished - clock["last"],
        "writing_seconds": 0.0,
    }
    del lm
    return finished - began, out["results"][task], split


def run_evalfleet(model: Path, task: str, include: Path, device: str, dtype: str) -> tuple[float, dict, dict]:
    from evalfleet.engines import run as engine_run
    from evalfleet.runtime.lm import EvalfleetLM
    from evalfleet.types import EvaluationRequest

    engine_run._first_request = False  # start-up here is the request's own, not this process's imports
    request = EvaluationRequest.model_validate({
        "model": {"path": str(model), "dtype": dtype, "device": device},
        "tasks": {"names": [task], "include_path": str(include)},
        "use_cache": False,
    })
    started = time.perf_counter()
    with recording(EvalfleetLM, "evalfleet"):
        result = engine_run.evaluate_request(request)
    timing = {**result.evalfleet["timing"], "layout": result.evalfleet["layout"]}
    return time.perf_counter() - started, result.results["results"][task], timing


def startup_seconds(args: list[str]) -> float:
    """Wall time of one `evalfleet ARGS` in a fresh interpreter (best of 3)."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "evalfleet.cli", *args], capture_output=True, check=True)
        best = min(best, time.perf_counter() - started)
    return round(best, 3)


def _recorded(function, *args):
    return function(*args), GENERATED


def call(isolate: bool, function, *args):
    """`function(*args)`, in a fresh spawned interpreter when `isolate`; the generations it recorded
    land in GENERATED either way."""
    if not isolate:
        return function(*args)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        out, generated = pool.submit(_recorded, function, *args).result()
    GENERATED.update(generated)
    return out


def metrics(results: dict) -> dict:
    return {k: v for k, v in results.items() if "," in k and "stderr" not in k}


def run_evalfleet_vllm(model: Path, task: str, include: Path, dtype: str) -> tuple[float, dict, dict]:
    """The vLLM backend in .venv-vllm; (wall seconds with start-up, task metrics, evalfleet timing)."""
    out = Path(tempfile.mkdtemp(prefix="evalfleet-bench-vllm-"))
    command = [str(ROOT.parent / ".venv-vllm" / "bin" / "evalfleet"), "run", "--backend", "vllm", "--device", "cpu",
               "--dtype", dtype, "--model", str(model), "--tasks", task, "--include-path", str(include),
               "--no-cache", "--output", str(out)]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - started
    document = json.loads((out / "results.json").read_text())
    return wall, document["results"][task], document["evalfleet"]["timing"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side; each side's best counts (the first builds requests)")
    parser.add_argument("--docs", type=int, default=500, help="bench_mc documents (4 requests each)")
    parser.add_argument("--compute-docs", type=int, default=125, help="bench_hellaswag and bench_mmlu documents")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--chain-questions", type=int, default=200, help="bench_chain questions")
    parser.add_argument("--lm-eval-batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--output", default=None)
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="vllm: add evalfleet's vLLM backend")
    parser.add_argument("--same-process", action="store_true", help="run both sides in this process, not one fresh process per run")
    args = parser.parse_args()
    args.output = args.output or str(ROOT / "results" / ("vs_lmeval_vllm.json" if args.backend == "vllm" else "vs_lmeval.json"))

    from evalfleet.runtime.threads import set_torch_threads

    # One thread count for both sides, chosen once from the free cores (see runtime/threads.py).
    os.environ["OMP_NUM_THREADS"] = str(set_torch_threads())

    work = Path(tempfile.mkdtemp(prefix="evalfleet-bench-"))
    (work / "tasks").mkdir()
    make_tasks(work / "tasks", args.docs, args.compute_docs)
    make_chain_task(work / "tasks", args.chain_questions)
    cases = args.cases.split(",")
    models = {shape: chain_model() if shape == "chain" else make_model(work / shape, shape)
              for shape in sorted({CASES[c] for c in cases})}
    peak = matmul_peak(args.device, DTYPES[args.dtype])
    report: dict = {
        "machine": {"torch_threads": torch.get_num_threads(), "device": args.device, "dtype": args.dtype,
                    "matmul_peak_gflops": round(peak / 1e9, 1)},
        "models": {shape: {"compute_parameters": compute_parameters(path)} for shape, path in models.items()},
        "lm_eval_batch_size": args.lm_eval_batch_size, "rounds": args.rounds,
        "processes": "both sides in this one" if args.same_process else "a fresh process per side and round",
        "startup": {"evalfleet --help": startup_seconds(["--help"]),
                    "evalfleet plan": startup_seconds(["plan", "--model", "meta-llama/Llama-2-7b-hf", "--gpus", "8xA100-80GB"])},
        "tasks": {},
    }
    print("start-up", json.dumps(report["startup"]), flush=True)
    for task in cases:
        model = models[CASES[task]]
        runs: dict[str, list] = {"lm_eval": [], "evalfleet": []}
        same_generations = []
        for _ in range(args.rounds):
            runs["lm_eval"].append(call(not args.same_process, run_lm_eval, model, task, work / "tasks", args.lm_eval_batch_size,
                                        args.device, args.dtype, work / "lm-eval-requests"))
            runs["evalfleet"].append(call(not args.same_process, run_evalfleet, model, task, work / "tasks", args.device, args.dtype))
            same_generations.append(GENERATED["lm_eval"] == GENERATED["evalfleet"])
            if args.backend == "vllm":
                runs.setdefault("vllm", []).append(run_evalfleet_vllm(model, task, work / "tasks", args.dtype))
        timing = runs["evalfleet"][0][2]
        requests, tokens = timing["requests"], timing["tokens"]
        flops = 2 * report["models"][CASES[task]]["compute_parameters"] * tokens
        entry: dict = {"requests": requests, "tokens": tokens, "model": CASES[task]}
        for side, rounds in ((side, runs[side]) for side in ("lm_eval", "evalfleet")):
            wall, _, split = min(rounds, key=lambda r: r[0])
            split = split if side == "lm_eval" else split["split"]
            entry[side] = {
                "wall_seconds": round(wall, 3), "requests_per_s": round(requests / wall, 2),
                "split": {k: round(v, 3) for k, v in split.items()},
                "mfu_of_compute": round(flops / max(split["compute_seconds"], 1e-9) / peak, 4),
                "all_walls": [round(r[0], 3) for r in rounds],
            }
        entry["speedup"] = round(entry["lm_eval"]["wall_seconds"] / entry["evalfleet"]["wall_seconds"], 3)
        # the first round, where both sides build their requests (no request cache on either side yet)
        entry["speedup_first_round"] = round(runs["lm_eval"][0][0] / runs["evalfleet"][0][0], 3)
        entry["speedup_compute"] = round(
            entry["lm_eval"]["split"]["compute_seconds"] / max(entry["evalfleet"]["split"]["compute_seconds"], 1e-9), 3)
        entry["same_metrics"] = all(metrics(runs["lm_eval"][0][1]) == metrics(r[1]) for r in runs["evalfleet"])
        if GENERATED["lm_eval"]:
            entry["generations"] = len(GENERATED["lm_eval"])
            entry["same_generations"] = all(same_generations)
            entry["mean_generated_chars"] = round(sum(map(len, GENERATED["lm_eval"].values())) / len(GENERATED["lm_eval"]), 1)
            entry["rows_per_decode_step"] = timing["layout"].get("rows_per_decode_step")
        if "vllm" in runs:
            entry["evalfleet_vllm"] = vllm_side(runs["vllm"], requests, tokens, entry, metrics(runs["lm_eval"][0][1]))
        report["tasks"][task] = entry
        print(task, json.dumps(entry), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


def vllm_side(rounds: list[tuple[float, dict, dict]], requests: int, tokens: int, entry: dict, lm_metrics: dict) -> dict:
    """The vLLM backend's figures: best wall with and without engine start-up, ratios to both peers."""
    times = [(wall, timing["wall_seconds"]) for wall, _, timing in rounds]
    total, evaluation = min(t for t, _ in times), min(e for _, e in times)
    lm_wall, ef_wall = entry["lm_eval"]["wall_seconds"], entry["evalfleet"]["wall_seconds"]
    return {
        "wall_seconds_with_startup": round(total, 3),
        "wall_seconds_evaluation": round(evaluation, 3),
        "requests_per_s": round(requests / evaluation, 2),
        "tokens_per_s": round(tokens / evaluation, 1),
        "speedup_vs_lm_eval_hf": round(lm_wall / evaluation, 3),
        "speedup_vs_evalfleet_hf": round(ef_wall / evaluation, 3),
        "speedup_vs_lm_eval_hf_with_startup": round(lm_wall / total, 3),
        "metrics": metrics(rounds[0][1]),
        "lm_eval_metrics": lm_metrics,
        "all_walls": [[round(t, 3), round(e, 3)] for t, e in times],
    }


if __name__ == "__main__":
    main()
