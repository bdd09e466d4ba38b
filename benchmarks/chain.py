"""A GSM8K-shaped generation case: step-by-step sums, a 2-shot prompt every question shares,
answers of 1 to 10 steps that end at a blank line, and a small model trained here to write them.

    Q: 4 + 7 + 2
    A: 4 + 7 = 11
    11 + 2 = 13
    The answer is 13.

A random-weight model never stops and every row runs to its token limit; this one learns the
format (a step per term, then the answer line and a blank line) in a minute or two on the CPU, so
its answers really differ in length, as chain-of-thought answers do. It is trained once, with a
fixed seed and one thread, and kept in a cache folder keyed by this file's training settings.

    python benchmarks/chain.py [--out FOLDER]   # train (or find) the model and print a few answers
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch

SHOTS = 2
STEPS = (1, 10)
SETTINGS = {"hidden": 160, "intermediate": 432, "layers": 3, "heads": 5, "steps": 700, "batch": 8, "length": 384,
            "lr": 3e-3, "seed": 0, "version": 1}
CACHE = Path(os.environ.get("EVALFLEET_BENCH_CACHE", Path.home() / ".cache" / "evalfleet-bench"))


def problem(rng: random.Random) -> dict:
    terms = [rng.randint(1, 9) for _ in range(rng.randint(STEPS[0], STEPS[1]) + 1)]
    lines, total = [], terms[0]
    for term in terms[1:]:
        lines.append(f"{total} + {term} = {total + term}")
        total += term
    lines.append(f"The answer is {total}.")
    return {"question": " + ".join(map(str, terms)), "answer": "\n".join(lines), "result": str(total)}


def make_chain_task(folder: Path, questions: int = 200, seed: int = 1) -> None:
    """`bench_chain`: lm-eval's generate_until with a first_n 2-shot prompt, stop at a blank line,
    the final number picked by a regex filter (GSM8K's own layout)."""
    rng = random.Random(seed)
    train = folder / "bench_chain_train.jsonl"
    test = folder / "bench_chain.jsonl"
    train.write_text("".join(json.dumps(problem(rng)) + "\n" for _ in range(SHOTS)))
    test.write_text("".join(json.dumps(problem(rng)) + "\n" for _ in range(questions)))
    (folder / "bench_chain.yaml").write_text(
        f"task: bench_chain\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {train}\n    test: {test}\n"
        "output_type: generate_until\ntraining_split: train\nfewshot_split: train\ntest_split: test\n"
        f"num_fewshot: {SHOTS}\nfewshot_config:\n  sampler: first_n\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: " {{answer}}"\ntarget_delimiter: ""\n'
        'fewshot_delimiter: "\\n\\n"\n'
        'generation_kwargs:\n  until: ["\\n\\n", "Q:"]\n  max_gen_toks: 160\n  do_sample: false\n'
        "filter_list:\n  - name: answer\n    filter:\n      - function: regex\n"
        '        regex_pattern: "The answer is (\\\\d+)"\n      - function: take_first\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )


def chain_model(out: Path | None = None) -> Path:
    """The trained model's folder: `out`, else the cache's, trained there the first time."""
    key = hashlib.sha256(json.dumps(SETTINGS, sort_keys=True).encode()).hexdigest()[:12]
    folder = out or CACHE / f"chain-{key}"
    if (folder / "config.json").exists():
        return folder
    train(folder)
    return folder


def _stream(tokenizer, rng: random.Random, length: int) -> list[int]:
    """Solved problems one after another, blank-line separated, as the prompt lays them out."""
    ids: list[int] = []
    while len(ids) < length + 1:
        p = problem(rng)
        ids += tokenizer.encode(f"Q: {p['question']}\nA: {p['answer']}\n\n")
    return ids[: length + 1]


def train(folder: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from evalfleet.types import DEMO_MODEL_DIR

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(SETTINGS["seed"])
    rng = random.Random(SETTINGS["seed"])
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=SETTINGS["hidden"], intermediate_size=SETTINGS["intermediate"],
        num_hidden_layers=SETTINGS["layers"], num_attention_heads=SETTINGS["heads"], num_key_value_heads=SETTINGS["heads"],
        max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=SETTINGS["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, SETTINGS["lr"], total_steps=SETTINGS["steps"], pct_start=0.1)
    started = time.perf_counter()
    model.train()
    for step in range(SETTINGS["steps"]):
        batch = torch.tensor([_stream(tokenizer, rng, SETTINGS["length"]) for _ in range(SETTINGS["batch"])])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == SETTINGS["steps"] - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval()
    partial = folder.with_name(folder.name + ".partial")  # a cut-short save is never taken for the model
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if folder.exists():
        folder.rmdir()
    partial.rename(folder)
    torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    folder = chain_model(args.out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    rng = random.Random(7)
    shots = "\n\n".join(f"Q: {p['question']}\nA: {p['answer']}" for p in (problem(rng) for _ in range(SHOTS)))
    for _ in range(4):
        p = problem(rng)
        ids = tokenizer.encode(f"{shots}\n\nQ: {p['question']}\nA:", return_tensors="pt")
        out = model.generate(ids, max_new_tokens=160, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        print(repr(tokenizer.decode(out[0, ids.shape[1]:])[:300]), "expected", p["result"])
    print(folder)


if __name__ == "__main__":
    main()
