"""evalfleet's hf backend against lm-eval's on one GPU, bf16, a random-weight ~1B Llama built there.

Per task: per-sample agreement (log-likelihoods within the float32 tolerance, and within a bf16
one; same greedy answers; same generated text), wall time and tokens/s for both, and the MFU of
each side's compute against the measured bf16 matmul peak. Then the dtype decision: a worker-group
rank on the GPU, asked `auto` by a driver that sees no GPU (as a Ray driver runs), must load
bfloat16 (float16 on a GPU without it), and the driver must record what it loaded. Run through
scripts/gpu/check.sh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from shapes import compute_parameters, make_model, make_tasks, matmul_peak  # noqa: E402
from vs_lmeval import lm_eval_clock  # noqa: E402

TASKS = ["demo_mc", "bench_hellaswag", "bench_mmlu", "demo_arith"]
BATCH = 32
SAMPLES: dict = {}  # task: (lm-eval's samples, evalfleet's)
DEVICE = os.environ.get("EVALFLEET_CHECK_DEVICE", "cuda")  # cpu: a dry run of one case here
CHAIN_QUESTIONS = int(os.environ.get("EVALFLEET_CHAIN_QUESTIONS", "600"))


def compare(expected: list[dict], actual: list[dict]) -> dict:
    """Agreement of two runs' samples of one task."""
    mine = {row["doc_id"]: row for row in actual}
    diffs, same_answer, texts = [], 0, []
    for row in expected:
        other = mine[row["doc_id"]]
        for a, b in zip(row["resps"], other["resps"], strict=True):
            a, b = a[0], b[0]
            if isinstance(a, str):
                texts.append(a == b)
            elif isinstance(a, (list, tuple)):
                diffs.append((float(a[0]), float(b[0])))
                same_answer += bool(a[1]) == bool(b[1])
            else:
                diffs.append((float(a), float(b)))
    out: dict = {"samples": len(expected)}
    if diffs:
        out["loglikelihoods"] = len(diffs)
        out["max_abs_diff"] = max(abs(a - b) for a, b in diffs)
        out["within_float32_tolerance"] = sum(abs(a - b) <= 1e-4 + 1e-5 * abs(a) for a, b in diffs) / len(diffs)
        out["within_2e-2_relative"] = sum(abs(a - b) <= 2e-2 * (1 + abs(a)) for a, b in diffs) / len(diffs)
        out["same_greedy_flag"] = same_answer / len(diffs)
    if texts:
        out["same_generation"] = sum(texts) / len(texts)
    return out


def loaded_by_a_rank(model: Path) -> dict:
    """What one rank on GPU 0 loads when asked `auto`, as the driver records it (run with no GPU of its own)."""
    from evalfleet.runtime.group import GroupSpec
    from evalfleet.runtime.workers import WorkerGroupRunner

    runner = WorkerGroupRunner(GroupSpec(str(model), dtype="auto", device="auto"), [["cuda:0"]]).start()
    try:
        layout = runner.describe()
    finally:
        runner.close()
    return {"dtype": layout["dtype"], "device_names": layout["device_names"]}


def dtype_decision(model: Path) -> dict:
    """The dtype decision of issue 21, on real hardware: the rank decides on its GPU, not the driver on its CPU."""
    driver = subprocess.run([sys.executable, __file__, "--loaded-by-a-rank", str(model)], capture_output=True,
                            text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, check=False)
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if driver.returncode != 0:
        return {"asked": "auto", "expected": expected, "ok": False, "error": driver.stderr.strip().splitlines()[-1:]}
    loaded = json.loads(driver.stdout.strip().splitlines()[-1])
    return {"asked": "auto", "expected": expected, **loaded, "ok": loaded["dtype"] == expected}


def compare_on(model: Path, dtype: str, tasks: list[str], manager, include: Path, work: Path, n: int,
               peak: float) -> dict:
    """lm-eval `hf` then evalfleet on one model, task by task: agreement, wall time, tokens/s, MFU."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from evalfleet.engines import run as engine_run
    from evalfleet.types import EvaluationRequest

    entries: dict = {}
    with lm_eval_clock() as clock:
        began = time.perf_counter()
        lm = HFLM(pretrained=str(model), dtype=dtype, batch_size=BATCH, device=DEVICE)
        reference = {}
        for task in tasks:
            clock["compute"], task_started = 0.0, time.perf_counter()
            out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, bootstrap_iters=0, log_samples=True)
            reference[task] = (time.perf_counter() - task_started, clock["compute"], out)
        load = round(time.perf_counter() - began - sum(r[0] for r in reference.values()), 1)
    del lm
    torch.cuda.empty_cache()
    engine_run._first_request = False
    for task in tasks:
        folder = work / "out" / task
        request = EvaluationRequest.model_validate({
            "model": {"path": str(model), "dtype": dtype, "device": DEVICE},
            "tasks": {"names": [task], "include_path": str(include)},
            "output_dir": str(folder), "log_samples": True, "use_cache": False,
        })
        task_started = time.perf_counter()
        result = engine_run.evaluate_request(request)
        wall = time.perf_counter() - task_started
        timing, layout = result.evalfleet["timing"], result.evalfleet["layout"]
        samples = [json.loads(line) for line in (folder / f"samples_{task}.jsonl").read_text().splitlines()]
        lm_wall, lm_compute, out = reference[task]
        expected = json.loads(json.dumps(out["samples"][task], default=str))
        SAMPLES[task] = (expected, samples)
        tokens = timing["tokens"]
        entry = {
            "model": model.name, "dtype": dtype, "requests": timing["requests"], "tokens": tokens,
            "agreement": compare(expected, samples),
            "same_metrics": {k: v for k, v in out["results"][task].items() if "," in k and "stderr" not in k}
            == {k: v for k, v in result.results["results"][task].items() if "," in k and "stderr" not in k},
            "lm_eval": {"wall_seconds": round(lm_wall, 2), "tokens_per_s": round(tokens / lm_wall),
                        "mfu_of_compute": round(2 * n * tokens / max(lm_compute, 1e-9) / peak, 4)},
            "evalfleet": {"wall_seconds": round(wall, 2), "tokens_per_s": round(tokens / wall),
                          "split": timing["split"],
                          "continuous_batching": layout.get("continuous_batching"),
                          "rows_per_decode_step": layout.get("rows_per_decode_step"),
                          "mfu_of_compute": round(2 * n * tokens / max(timing["split"]["compute_seconds"], 1e-9) / peak, 4)},
        }
        entry["speedup"] = round(lm_wall / wall, 2)
        entry["speedup_compute"] = round(lm_compute / max(timing["split"]["compute_seconds"], 1e-9), 2)
        entries[task] = entry
        print(task, json.dumps(entry), flush=True)
    entries["lm_eval_load_seconds"] = load
    return entries


def controls(model: Path, tasks: list[str], manager) -> dict:
    """What bf16 itself moves: lm-eval against lm-eval at another batch size (other shapes, other
    rounding), and lm-eval with its softmax in float32 (`softmax_dtype`) against lm-eval's default
    and against evalfleet, which takes the log-softmax of float32 logits."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    out: dict = {}
    for name, kwargs in (("lm_eval_batch_8", {"batch_size": 8}),
                         ("lm_eval_softmax_float32", {"batch_size": BATCH, "softmax_dtype": "float32"})):
        lm = HFLM(pretrained=str(model), dtype="bfloat16", device=DEVICE, **kwargs)
        for task in tasks:
            run = simple_evaluate(model=lm, tasks=[task], task_manager=manager, bootstrap_iters=0, log_samples=True)
            mine = json.loads(json.dumps(run["samples"][task], default=str))
            expected, evalfleet = SAMPLES[task]
            entry = {"against_lm_eval": compare(expected, mine), "against_evalfleet": compare(mine, evalfleet)}
            out.setdefault(task, {})[name] = entry
            print("control", task, name, json.dumps(entry), flush=True)
        del lm
        torch.cuda.empty_cache()
    return out


def main(output: Path) -> None:
    from chain import chain_model, make_chain_task

    from evalfleet.tasks import build_task_manager

    assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    work = Path(tempfile.mkdtemp(prefix="evalfleet-gpu-"))
    (work / "tasks").mkdir()
    make_tasks(work / "tasks", docs=300, compute_docs=300)
    make_chain_task(work / "tasks", CHAIN_QUESTIONS)
    started = time.perf_counter()
    model = make_model(work / "model", "1b", device="cuda", dtype=torch.bfloat16)
    torch.cuda.empty_cache()
    n = compute_parameters(model)
    peak = matmul_peak("cuda", torch.bfloat16, size=8192)
    report: dict = {"gpu": torch.cuda.get_device_name(0), "compute_parameters": n, "bf16_matmul_peak_tflops": round(peak / 1e12, 1),
                    "model_build_seconds": round(time.perf_counter() - started, 1), "tasks": {}}
    print(json.dumps(report), flush=True)

    def save() -> None:
        output.write_text(json.dumps(report, indent=2) + "\n")

    manager = build_task_manager(TASKS + ["bench_chain"], str(work / "tasks"))
    report["tasks"] = compare_on(model, "bfloat16", TASKS, manager, work / "tasks", work, n, peak)
    save()
    # the GSM8K-shaped chain of thought (benchmarks/chain.py's trained model, float32 as trained):
    # static batches in lm-eval against continuous batching with the 2-shot prefix shared
    chain = chain_model()
    report["chain"] = compare_on(chain, "float32", ["bench_chain"], manager, work / "tasks", work, compute_parameters(chain), peak)
    save()
    if os.environ.get("EVALFLEET_CHECK_CONTROLS", "1") != "0":
        report["bf16_controls"] = controls(model, TASKS, manager)
        save()
    report["dtype_decision"] = dtype_decision(model)
    print("dtype_decision", json.dumps(report["dtype_decision"]), flush=True)
    save()
    print(f"wrote {output}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--loaded-by-a-rank"]:
        print(json.dumps(loaded_by_a_rank(Path(sys.argv[2]))))
    else:
        main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check.json"))
