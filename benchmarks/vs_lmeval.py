"""evalfleet against lm-eval's own `hf` backend, same model, same tasks, one process, alternating.

Tasks:
- `bench_mc`: a generated multiple-choice task, 500 documents × 4 multi-token choices
  (2,000 log-likelihood requests), contexts of 100–300 tokens;
- `demo_arith`: the bundled arithmetic generation task (greedy, stop at newline).

The model is a random Llama of realistic shape for a CPU (hidden 256, 4 layers, 32k-position
budget irrelevant) with the demo model's tokenizer. Both sides run in float32 on the CPU,
with the request cache off for evalfleet. lm-eval uses batch size 16 (its default `auto`
only probes a GPU). Writes benchmarks/results/vs_lmeval.json.

    python benchmarks/vs_lmeval.py [--rounds 2] [--docs 500] [--backend vllm]

With `--backend vllm` a third side runs: evalfleet's vLLM backend, as `.venv-vllm/bin/evalfleet`
(`make vllm`) in its own process; its wall time is given with and without the engine's
start-up. Writes benchmarks/results/vs_lmeval_vllm.json then.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
WORDS = "the a river farmer child dog bird house tree quiet red green small old young happy runs sees finds carries".split()


def make_mc_task(folder: Path, docs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = []
    for index in range(docs):
        story = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 200)))
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(4)]
        rows.append({"query": f"Story {index}: {story}. Question: what happens next?", "choices": choices, "label": rng.randrange(4)})
    data = folder / "bench_mc.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "bench_mc.yaml").write_text(
        "task: bench_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "{{query}}"\ndoc_to_choice: choices\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )


def make_model(folder: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from evalfleet.types import DEMO_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_lm_eval(model: Path, task: str, manager, batch_size: int) -> tuple[float, dict]:
    from lm_eval import simple_evaluate

    started = time.perf_counter()
    out = simple_evaluate(
        model="hf", model_args={"pretrained": str(model), "dtype": "float32"}, tasks=[task],
        task_manager=manager, batch_size=batch_size, device="cpu", bootstrap_iters=0,
    )
    return time.perf_counter() - started, out["results"][task]


def run_evalfleet(model: Path, task: str, include: Path) -> tuple[float, dict, dict]:
    from evalfleet.engines.run import evaluate_request
    from evalfleet.types import EvaluationRequest

    request = EvaluationRequest.model_validate({
        "model": {"path": str(model), "dtype": "float32", "device": "cpu"},
        "tasks": {"names": [task], "include_path": str(include)},
        "use_cache": False,
    })
    started = time.perf_counter()
    result = evaluate_request(request)
    return time.perf_counter() - started, result.results["results"][task], result.evalfleet["timing"]


def run_evalfleet_vllm(model: Path, task: str, include: Path) -> tuple[float, dict, dict]:
    """The vLLM backend in .venv-vllm; (wall seconds with start-up, task metrics, evalfleet timing)."""
    out = Path(tempfile.mkdtemp(prefix="evalfleet-bench-vllm-"))
    command = [str(ROOT.parent / ".venv-vllm" / "bin" / "evalfleet"), "run", "--backend", "vllm", "--device", "cpu",
               "--dtype", "float32", "--model", str(model), "--tasks", task, "--include-path", str(include),
               "--no-cache", "--output", str(out)]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - started
    document = json.loads((out / "results.json").read_text())
    return wall, document["results"][task], document["evalfleet"]["timing"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--docs", type=int, default=500)
    parser.add_argument("--lm-eval-batch-size", type=int, default=16)
    parser.add_argument("--output", default=None)
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="vllm: add evalfleet's vLLM backend")
    args = parser.parse_args()
    args.output = args.output or str(ROOT / "results" / ("vs_lmeval_vllm.json" if args.backend == "vllm" else "vs_lmeval.json"))

    from evalfleet.tasks import build_task_manager

    work = Path(tempfile.mkdtemp(prefix="evalfleet-bench-"))
    (work / "tasks").mkdir()
    make_mc_task(work / "tasks", args.docs)
    model = make_model(work / "model")
    report: dict = {"model": "random Llama, hidden 256, 4 layers, float32, CPU", "torch_threads": torch.get_num_threads(),
                    "lm_eval_batch_size": args.lm_eval_batch_size, "rounds": args.rounds, "tasks": {}}
    for task in ("bench_mc", "demo_arith"):
        manager = build_task_manager([task], str(work / "tasks"))
        lm_times, ef_times, timing, metrics = [], [], {}, {}
        vllm_times: list[tuple[float, float]] = []
        for _ in range(args.rounds):
            seconds, metrics["lm_eval"] = run_lm_eval(model, task, manager, args.lm_eval_batch_size)
            lm_times.append(seconds)
            seconds, metrics["evalfleet"], timing = run_evalfleet(model, task, work / "tasks")
            ef_times.append(seconds)
            if args.backend == "vllm":
                seconds, metrics["vllm"], vllm_timing = run_evalfleet_vllm(model, task, work / "tasks")
                vllm_times.append((seconds, vllm_timing["wall_seconds"]))
        requests, tokens = timing["requests"], timing["tokens"]
        lm_wall, ef_wall = min(lm_times), min(ef_times)
        report["tasks"][task] = {
            "requests": requests,
            "tokens": tokens,
            "lm_eval": {"wall_seconds": round(lm_wall, 3), "requests_per_s": round(requests / lm_wall, 2),
                        "tokens_per_s": round(tokens / lm_wall, 1)},
            "evalfleet": {"wall_seconds": round(ef_wall, 3), "requests_per_s": round(requests / ef_wall, 2),
                          "tokens_per_s": round(tokens / ef_wall, 1)},
            "speedup_requests_per_s": round(lm_wall / ef_wall, 3),
            "same_metrics": {k: v for k, v in metrics["lm_eval"].items() if "," in k and "stderr" not in k}
            == {k: v for k, v in metrics["evalfleet"].items() if "," in k and "stderr" not in k},
            "all_walls": {"lm_eval": [round(t, 3) for t in lm_times], "evalfleet": [round(t, 3) for t in ef_times]},
        }
        if vllm_times:
            report["tasks"][task]["evalfleet_vllm"] = vllm_side(vllm_times, requests, tokens, lm_wall, ef_wall, metrics)
        print(task, json.dumps(report["tasks"][task]), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


def vllm_side(times: list[tuple[float, float]], requests: int, tokens: int, lm_wall: float, ef_wall: float,
              metrics: dict) -> dict:
    """The vLLM backend's figures: best wall with and without engine start-up, ratios to both peers."""
    total, evaluation = min(t for t, _ in times), min(e for _, e in times)
    agreeing = {k: v for k, v in metrics["vllm"].items() if "," in k and "stderr" not in k}
    return {
        "wall_seconds_with_startup": round(total, 3),
        "wall_seconds_evaluation": round(evaluation, 3),
        "requests_per_s": round(requests / evaluation, 2),
        "tokens_per_s": round(tokens / evaluation, 1),
        "speedup_vs_lm_eval_hf": round(lm_wall / evaluation, 3),
        "speedup_vs_evalfleet_hf": round(ef_wall / evaluation, 3),
        "speedup_vs_lm_eval_hf_with_startup": round(lm_wall / total, 3),
        "metrics": agreeing,
        "all_walls": [[round(t, 3), round(e, 3)] for t, e in times],
    }


if __name__ == "__main__":
    main()
