"""Tiny causal LMs built from configs with fixed seeds, and tokenizers trained on the spot.

Nothing here downloads: the `tokenizers` library trains a byte-level BPE on the demo texts.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_TASKS = REPO / "src" / "evalfleet" / "tasks" / "demo"


def _corpus() -> list[str]:
    lines = []
    for path in sorted(DEMO_TASKS.glob("*.jsonl")):
        for row in map(json.loads, path.read_text().splitlines()):
            lines.extend(str(v) for v in row.values() if isinstance(v, str))
            lines.extend(" ".join(v) for v in row.values() if isinstance(v, list))
    return lines


def train_tokenizer(folder: Path, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on the demo texts, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>")
    wrapped.save_pretrained(folder)
    return wrapped


def build_tiny_model(folder: Path, family: str = "gpt_neox", seed: int = 7, max_positions: int = 128, layers: int = 2) -> Path:
    """A random tiny causal LM of `family` with `layers` blocks, saved with save_pretrained (safetensors)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(folder)
    common = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if family == "gpt_neox":
        config = AutoConfig.for_model(
            "gpt_neox", hidden_size=48, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=max_positions, bos_token_id=tokenizer.eos_token_id, **common,
        )
    elif family == "qwen2":
        config = AutoConfig.for_model(
            "qwen2", hidden_size=48, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, max_position_embeddings=max_positions, tie_word_embeddings=False, **common,
        )
    elif family == "llama-vllm":  # vLLM's CPU attention kernels take head sizes of 32 and up
        config = AutoConfig.for_model(
            "llama", hidden_size=128, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=max_positions, **common,
        )
    else:
        config = AutoConfig.for_model(
            "llama", hidden_size=48, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, max_position_embeddings=max_positions, **common,
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # sharper than the default init, so greedy outputs vary with the input
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.3)
    model.save_pretrained(folder)
    return folder
