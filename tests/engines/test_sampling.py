"""Sampling in the transformers backend: lm-eval's settings, one seed per draw, a cache that keeps seeds apart.

A task with `do_sample: true` and `repeats: 3` draws three independent answers per document;
the same seed gives the same draws whatever the batching, another seed others, and the request
cache never answers one seed's (or a greedy) request with another's draws. Each draw follows the
distribution transformers' own `generate(do_sample=True)` samples from (lm-eval's `hf` backend).
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from chat_support import build_chat_model, build_chat_tasks
from samples import load_samples

from evalfleet.engines.lightweight import LightweightEvaluationEngine
from evalfleet.engines.job_size import count_here
from evalfleet.runtime.backends.base import GenerationItem
from evalfleet.runtime.backends.hf import HFBackend
from evalfleet.types import EvaluationRequest

TASK = "chat_sampled"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_chat_model(tmp_path_factory.mktemp("models") / "tiny-sampler", templates=False)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return build_chat_tasks(tmp_path_factory.mktemp("sampled-tasks"))


@pytest.fixture(scope="module")
def engine():
    return LightweightEvaluationEngine()


def _request(model, tasks, out, cache=None, **fields) -> EvaluationRequest:
    return EvaluationRequest.model_validate({
        "model": {"path": str(model), "dtype": "float32", "device": "cpu"},
        "tasks": {"names": [TASK], "include_path": str(tasks), "limit": 8},
        "output_dir": str(out), "log_samples": True, "use_cache": cache is not None, "cache_path": cache, **fields,
    })


def _draws(engine, model, tasks, out, cache=None, **fields) -> tuple[list[list[str]], dict]:
    """Each document's three draws, and the run's cache figures."""
    result = asyncio.run(engine.evaluate(_request(model, tasks, out, cache, **fields)))
    rows = sorted(load_samples(out)[TASK], key=lambda row: row["doc_id"])
    return [row["resps"][0] for row in rows], result.evalfleet["cache"]


def test_the_same_seed_draws_the_same_answers_and_repeats_are_independent(engine, model, tasks, tmp_path):
    first, _ = _draws(engine, model, tasks, tmp_path / "a")
    again, _ = _draws(engine, model, tasks, tmp_path / "b", max_batch_tokens=64)  # other batches, same draws
    assert again == first
    assert sum(len(set(draws)) > 1 for draws in first) >= 6  # three draws of one prompt differ
    other, _ = _draws(engine, model, tasks, tmp_path / "c", seed=[0, 1234, 99, 1234])
    assert sum(a != b for a, b in zip(first, other)) >= 6
    greedy, _ = _draws(engine, model, tasks, tmp_path / "d", harness={"gen_kwargs": {"do_sample": False}})
    assert all(len(set(draws)) == 1 for draws in greedy)


def test_the_cache_never_serves_another_seed_or_setting(engine, model, tasks, tmp_path):
    cache = str(tmp_path / "cache.sqlite")
    first, figures = _draws(engine, model, tasks, tmp_path / "a", cache)
    assert figures["hits"] == 0 and figures["computed"] == 24  # 8 documents x 3 independent draws
    assert count_here(_request(model, tasks, tmp_path / "a", cache))["token_requests"] == 24  # as counted at submit
    same, figures = _draws(engine, model, tasks, tmp_path / "b", cache)
    assert same == first and figures["computed"] == 0
    for out, fields in (("c", {"seed": [0, 1234, 7, 1234]}), ("d", {"harness": {"gen_kwargs": {"temperature": 0.5}}})):
        draws, figures = _draws(engine, model, tasks, tmp_path / out, cache, **fields)
        assert figures["hits"] == 0 and figures["computed"] == 24 and draws != first
    greedy, figures = _draws(engine, model, tasks, tmp_path / "e", cache, harness={"gen_kwargs": {"do_sample": False}})
    assert figures["hits"] == 0 and figures["computed"] == 8


def test_draws_follow_transformers_sampling_distribution(model):
    """Many one-token draws (one seed each) against the probabilities `generate(do_sample=True)` samples
    from, warpers included: temperature, top-k and top-p as transformers applies them."""
    backend = HFBackend.load(str(model), dtype="float32", device="cpu")
    context = tuple(backend.tokenizer("Say: green river stone")["input_ids"])
    settings = {"temperature": 3.0, "top_k": 20, "top_p": 0.9}  # 18 tokens kept, by both cuts
    draws = 3000
    texts = backend.generate([
        GenerationItem(context, (), 1, tuple(sorted({**settings, "seed": seed}.items()))) for seed in range(draws)
    ])
    with torch.inference_mode():
        out = backend.model.generate(input_ids=torch.tensor([context]), do_sample=True, max_new_tokens=1,
                                     output_scores=True, return_dict_in_generate=True, pad_token_id=backend.pad_id,
                                     **settings)
    expected: dict[str, float] = {}  # by text, as the backend answers (tokens that read alike add up)
    for token, probability in enumerate(torch.softmax(out.scores[0][0], dim=-1).tolist()):
        text = backend.tokenizer.decode([token], skip_special_tokens=True)
        expected[text] = expected.get(text, 0.0) + probability
    observed = {text: texts.count(text) / draws for text in set(texts)}
    assert all(expected[text] > 0 for text in observed)  # nothing drawn that top-k and top-p leave out
    distance = 0.5 * sum(abs(observed.get(text, 0.0) - p) for text, p in expected.items())
    assert distance < 0.06  # 0.026 here: 3,000 draws over 18 tokens
