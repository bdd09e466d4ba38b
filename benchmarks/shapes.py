"""Benchmark tasks and models, generated on the spot (nothing downloads).

- `bench_mc`: multiple choice, 4 multi-token choices, contexts of 100–300 tokens (fixed costs dominate
  on the small model);
- `bench_hellaswag`: HellaSwag's shape, a context of ~80 tokens and 4 endings of ~25 tokens;
- `bench_mmlu`: MMLU's shape, 5-shot with the `first_n` sampler (every question starts with the same
  five solved examples) and single-token answers (A/B/C/D).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = "the a river farmer child dog bird house tree quiet red green small old young happy runs sees finds carries".split()
MODELS = {
    # hidden, intermediate, layers, heads, kv heads
    "small": (256, 688, 4, 8, 4),
    "7m": (384, 1024, 4, 6, 6),
    "1b": (2048, 5632, 22, 32, 4),  # TinyLlama's layers: ~0.97B parameters with the demo vocabulary
}


def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _yaml(folder: Path, name: str, files: dict[str, Path], body: str) -> None:
    data = "".join(f"    {split}: {path}\n" for split, path in files.items())
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n{data}"
        "output_type: multiple_choice\ntest_split: test\n" + body
        + "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )


def _write(folder: Path, name: str, rows: list[dict]) -> Path:
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def make_tasks(folder: Path, docs: int, compute_docs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = [{"query": f"Story {i}: {_text(rng, 60, 200)}. Question: what happens next?",
             "choices": [_text(rng, 2, 6) for _ in range(4)], "label": rng.randrange(4)} for i in range(docs)]
    _yaml(folder, "bench_mc", {"test": _write(folder, "bench_mc", rows)},
          'doc_to_text: "{{query}}"\ndoc_to_choice: choices\ndoc_to_target: label\n')

    rows = [{"ctx": _text(rng, 70, 90), "endings": [_text(rng, 22, 28) for _ in range(4)], "label": rng.randrange(4)}
            for _ in range(compute_docs)]
    _yaml(folder, "bench_hellaswag", {"test": _write(folder, "bench_hellaswag", rows)},
          'doc_to_text: "{{ctx}}"\ndoc_to_choice: endings\ndoc_to_target: label\n')

    def question() -> dict:
        return {"question": _text(rng, 25, 40), "options": [_text(rng, 5, 10) for _ in range(4)], "label": rng.randrange(4)}

    train = _write(folder, "bench_mmlu_train", [question() for _ in range(5)])
    test = _write(folder, "bench_mmlu", [question() for _ in range(compute_docs)])
    _yaml(folder, "bench_mmlu", {"train": train, "test": test},
          "training_split: train\nfewshot_split: train\nnum_fewshot: 5\nfewshot_config:\n  sampler: first_n\n"
          'description: "The following are multiple choice questions about stories.\\n\\n"\n'
          'doc_to_text: "{{question}}\\nA. {{options[0]}}\\nB. {{options[1]}}\\nC. {{options[2]}}\\nD. {{options[3]}}\\nAnswer:"\n'
          'doc_to_choice: ["A", "B", "C", "D"]\ndoc_to_target: label\n')


def make_model(folder: Path, shape: str, device: str = "cpu", dtype: torch.dtype = torch.float32, vocab: int | None = None) -> Path:
    """A random Llama of `shape` with the demo model's tokenizer, saved with save_pretrained."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from evalfleet.types import DEMO_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    hidden, intermediate, layers, heads, kv_heads = MODELS[shape]
    config = LlamaConfig(
        vocab_size=vocab or len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def compute_parameters(folder: Path) -> int:
    """Parameters a token passes through (all but the input embedding): 2 FLOPs each per token."""
    config = json.loads((folder / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = hidden // config["num_attention_heads"]
    attention = hidden * hidden * 2 + 2 * hidden * config["num_key_value_heads"] * head_dim
    mlp = 3 * hidden * config["intermediate_size"]
    return layers * (attention + mlp) + hidden * config["vocab_size"]


def matmul_peak(device: str = "cpu", dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """The machine's measured matmul FLOP/s (best of `repeats`), the MFU's denominator."""
    import time

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - started) / 4)
    return 2 * size**3 / best
