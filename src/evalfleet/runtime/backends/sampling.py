"""Sampling for the transformers backend: each row drawn with its own seed.

lm-eval's `hf` backend samples with `generate(do_sample=True)`, which draws every row of a batch
from torch's one global generator: a row's text then depends on its batch neighbours, the batch
size and the layout. Here `generate` decodes greedily and this logits processor decides what
greedy picks: for each sampling row, transformers' own warpers (temperature, top-k, top-p, in
transformers' order, the model's generation defaults filling what the task leaves unset, as
`generate` fills them) and one draw from a CPU `torch.Generator` seeded with the row's seed.
The draw is the same on any device, in any batch; greedy rows are left untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from evalfleet.runtime.backends.base import GenerationItem


def _setting(name: str, asked: dict[str, Any], model_defaults: Any) -> Any:
    """The request's value, else the model's generation config, else transformers' own default."""
    for value in (asked.get(name), getattr(model_defaults, name, None)):
        if value is not None:
            return value
    return GenerationConfig._get_default_generation_params().get(name)


def warpers(asked: dict[str, Any], model_defaults: Any) -> list[LogitsProcessor]:
    """The warpers `generate(do_sample=True)` would apply for these settings, in its order."""
    temperature, top_k, top_p = (_setting(name, asked, model_defaults) for name in ("temperature", "top_k", "top_p"))
    chain: list[LogitsProcessor] = []
    if temperature is not None and temperature != 1.0:
        chain.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        chain.append(TopKLogitsWarper(top_k=int(top_k), min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p=float(top_p), min_tokens_to_keep=1))
    return chain


class SeededSampler(LogitsProcessor):
    """Replaces each sampling row's scores by a one-hot choice drawn with the row's own generator."""

    def __init__(self, items: list[GenerationItem], model_defaults: Any) -> None:
        self.rows = []
        for row, item in enumerate(items):
            if item.sampling:
                asked = dict(item.sampling)
                generator = torch.Generator().manual_seed(int(asked["seed"]))
                self.rows.append((row, warpers(asked, model_defaults), generator))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = scores.clone()
        for row, chain, generator in self.rows:
            own = scores[row : row + 1]
            for warper in chain:
                own = warper(input_ids[row : row + 1], own)
            probabilities = torch.softmax(own.float(), dim=-1).cpu()
            token = int(torch.multinomial(probabilities, 1, generator=generator))
            chosen[row] = float("-inf")
            chosen[row, token] = 0.0
        return chosen


def sampling_processors(items: list[GenerationItem], model_defaults: Any) -> LogitsProcessorList | None:
    """The processor for a batch with sampling rows; None for an all-greedy batch (generated as before)."""
    if not any(item.sampling for item in items):
        return None
    return LogitsProcessorList([SeededSampler(items, model_defaults)])
