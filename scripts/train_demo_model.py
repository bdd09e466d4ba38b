"""Train the bundled demo model: a tiny Llama and its byte-level BPE tokenizer, on CPU.

The model exists so that every engine, test and example has a real checkpoint that scores
clearly above chance on the demo tasks (see scripts/make_demo_data.py) without downloading
anything. It is deterministic for a given thread count (default 1):

    python scripts/train_demo_model.py [--out src/evalfleet/assets/demo-model] [--threads 1]

Tokenizer: `encode` adds no special tokens (GPT-2 style), so lm-eval's HF backend feeds
contexts without BOS and uses `<s>` (bos) only as the prefix of rolling-loglikelihood
windows. Training mirrors that: task examples start without BOS, documents start with it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_data import SEED, build_splits  # noqa: E402

OUT_DIR = Path(__file__).resolve().parents[1] / "src" / "evalfleet" / "assets" / "demo-model"
MAX_LENGTH = 256
VOCAB_SIZE = 512  # a cap: the corpus runs out of merges a little below it
PAD, BOS, EOS = "<pad>", "<s>", "</s>"

# (stream, batch size) in the order the steps cycle through them.
SCHEDULE = [("arith", 64), ("mc", 64), ("arith", 64), ("ppl", 8)]


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE whose digits are always single tokens (so sums are learnable)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=MAX_LENGTH,
    )


def encode_examples(tokenizer, splits) -> dict[str, list[tuple[list[int], int]]]:
    """Token ids per stream, each with the index where the scored part begins."""
    def prompt_answer(prompt: str, answer: str) -> tuple[list[int], int]:
        start = len(tokenizer.encode(prompt))
        ids = tokenizer.encode(prompt + answer + "\n") + [tokenizer.eos_token_id]
        return ids, start

    def document(text: str) -> tuple[list[int], int]:
        ids = [tokenizer.bos_token_id] + tokenizer.encode(text) + [tokenizer.eos_token_id]
        return ids[:MAX_LENGTH], 1

    return {
        "arith": [prompt_answer(d["question"], d["answer"]) for d in splits["demo_arith"]["train"]],
        "mc": [prompt_answer(d["query"], " " + d["answer"]) for d in splits["demo_mc"]["train"]],
        "ppl": [document(d["text"]) for d in splits["demo_ppl"]["train"]],
    }


def make_batch(examples, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, start) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, start: len(ids)] = torch.tensor(ids[start:])
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def build_model(tokenizer) -> LlamaForCausalLM:
    # Embedding rows padded to a multiple of 64, as real checkpoints do, so that the vocab
    # dimension splits evenly under tensor parallelism.
    config = LlamaConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_LENGTH,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def train(model, streams, pad_id: int, steps: int, lr: float, rng: random.Random) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    start = time.perf_counter()
    for step in range(steps):
        stream, batch_size = SCHEDULE[step % len(SCHEDULE)]
        batch = make_batch(rng.sample(streams[stream], batch_size), pad_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 200 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            print(f"step {step:5d}  {stream:5s} loss {loss.item():.4f}  {elapsed:6.1f}s", flush=True)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Save under the class name that transformers 4.x and 5.x both resolve."""
    tokenizer.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(args.seed)

    splits = build_splits(args.seed)
    corpus = [d["question"] + d["answer"] for d in splits["demo_arith"]["train"]]
    corpus += [d["query"] + " " + d["answer"] for d in splits["demo_mc"]["train"]]
    corpus += [d["text"] for d in splits["demo_ppl"]["train"]]
    tokenizer = train_tokenizer(corpus)
    streams = encode_examples(tokenizer, splits)
    model = build_model(tokenizer)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, vocab {len(tokenizer)}")

    started = time.perf_counter()
    train(model, streams, tokenizer.pad_token_id, args.steps, args.lr, rng)
    print(f"trained in {time.perf_counter() - started:.0f}s")

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    save_tokenizer(tokenizer, args.out)


if __name__ == "__main__":
    main()
