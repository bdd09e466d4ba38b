"""Continuous batching: rows leave as they stop and waiting ones take their room; the texts must be
lm-eval `hf`'s, request by request, whatever joins or leaves beside them."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from evalfleet.runtime.backends import decode
from evalfleet.runtime.backends.base import GenerationItem
from evalfleet.runtime.backends.hf import HFBackend
from evalfleet.runtime.lm import EvalfleetLM
from evalfleet.runtime.runner import InProcessRunner
from evalfleet.types import DEMO_MODEL_DIR

SHOTS = "Q: 12 + 7 = ?\nA: 19\n\nQ: 3 + 4 = ?\nA: 7\n\nQ: 40 + 2 = ?\nA: 42\n\n"


@pytest.fixture(scope="module", params=["demo", "tiny"])
def model_path(request, tiny_model) -> str:
    """The demo model (stops by itself, at newlines and its end token) and a random-weight NeoX (rarely stops)."""
    return str(DEMO_MODEL_DIR if request.param == "demo" else tiny_model)


@pytest.fixture(scope="module")
def backend(model_path) -> HFBackend:
    loaded = HFBackend.load(model_path, device="cpu", dtype="float32", share_prefixes=True)
    assert loaded.continuous and loaded.reuse_prefixes
    return loaded


@pytest.fixture(scope="module")
def lm_eval_hf(model_path):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model_path, batch_size=4, device="cpu", dtype="float32")


def _requests(backend: HFBackend) -> list[tuple[str, dict]]:
    """Mixed prompt lengths (some few-shot), token limits, stop strings; rows stopping at their first
    token, rows whose stop strings never come."""
    rnd = random.Random(5)
    first = backend.generate_static([GenerationItem(tuple(backend.tokenizer.encode(SHOTS + "Q: 5 + 5 = ?\nA:")), (), 1)])[0]
    requests = []
    for n in range(36):
        question = f"Q: {rnd.randint(1, 99)} + {rnd.randint(1, 99)} = ?\nA:"
        context = (SHOTS if n % 3 else "") + question + (" x" * rnd.randint(0, 12) if n % 5 == 0 else "")
        until = [["\n\n", "Q:"], ["\n"], ["@@ never @@"], [" ", "1"]][n % 4]
        requests.append((context, {"until": until, "max_gen_toks": rnd.choice([1, 2, 5, 17, 40]), "do_sample": False}))
    if first.strip():
        requests.append((SHOTS + "Q: 5 + 5 = ?\nA:", {"until": [first], "max_gen_toks": 30, "do_sample": False}))  # stops at once
    requests.append((SHOTS, {"until": ["@@ never @@"], "max_gen_toks": 48, "do_sample": False}))  # the prefix alone
    return requests


def _theirs(lm_eval_hf, requests) -> list[str]:
    instances = [Instance("generate_until", {}, request, idx=i) for i, request in enumerate(requests)]
    return lm_eval_hf.generate_until(instances, disable_tqdm=True)


def _ours(backend: HFBackend, requests, batch_size: int = 6) -> list[str]:
    lm = EvalfleetLM(InProcessRunner(backend, "cpu"), backend.tokenizer, "test", batch_size=batch_size)
    return lm.generate_until([Instance("generate_until", {}, request, idx=i) for i, request in enumerate(requests)])


def test_continuous_generations_equal_lm_eval_hf(backend, lm_eval_hf):
    requests = _requests(backend)
    steps, rows = backend.decode_steps, backend.decoded_rows
    ours = _ours(backend, requests)
    assert backend.decode_steps > steps, "the continuous decoder did not run"
    assert ours == _theirs(lm_eval_hf, requests)
    assert backend.decoded_rows - rows > backend.decode_steps - steps  # several rows shared the steps


def test_rows_join_and_leave_at_any_room_and_the_texts_stay(backend, lm_eval_hf):
    """The same requests through one row at a time, a few, and all at once, under a token budget that
    forces newcomers to wait for room: every way gives lm-eval's texts."""
    requests = _requests(backend)
    theirs = _theirs(lm_eval_hf, requests)
    assert _ours(backend, requests, batch_size=1) == theirs
    assert _ours(backend, requests, batch_size=64) == theirs
    items = [_item(backend, context, kwargs) for context, kwargs in requests]
    got: dict[int, str] = {}
    backend.decoder(5, 5 * 60, 5 * 60).run(items, got.__setitem__)
    assert [got[k] for k in range(len(items))] == theirs
    assert backend.generate(items) == theirs  # one batch whose rows only leave (a worker group's rank)


def test_a_row_leaves_the_batch_in_the_step_it_stops(backend, lm_eval_hf, monkeypatch):
    """No decode step is spent on a row that already stopped: each step's rows are running rows, the
    cache holds exactly them, and the steps' rows add up to the tokens generated after each row's
    first; the texts stay lm-eval's while rows move into the places of those that left."""
    requests = _requests(backend)
    items = [_item(backend, context, kwargs) for context, kwargs in requests]
    seen: list[tuple[int, bool, int, int]] = []
    rows: list[decode._Row] = []
    got: dict[int, str] = {}  # the rows reported finished, by request
    step, prefill = decode.ContinuousDecoder._step, decode.ContinuousDecoder._prefill

    def watched(self):
        layer = next(layer for layer in self.cache.layers if layer.is_initialized)
        seen.append((len(self.active), any(row.index in got for row in self.active), layer.keys.shape[0], self.mask.shape[0]))
        step(self)

    monkeypatch.setattr(decode.ContinuousDecoder, "_step", watched)
    monkeypatch.setattr(decode.ContinuousDecoder, "_prefill", lambda self, joining: rows.extend(joining) or prefill(self, joining))
    backend.decoder(16, 10**5, 10**5).run(items, got.__setitem__)  # one row is under a quarter of a full batch
    assert [got[k] for k in range(len(items))] == _theirs(lm_eval_hf, requests)
    assert seen and not any(done for _, done, _, _ in seen)
    assert all(active == cached == masked for active, _, cached, masked in seen)
    assert sum(active for active, *_ in seen) == sum(len(row.tokens) - 1 for row in rows)
    assert len({active for active, *_ in seen}) > 3  # rows left at many sizes of the batch


def _item(backend: HFBackend, context: str, kwargs: dict) -> GenerationItem:
    eos = backend.tokenizer.decode(backend.tokenizer.eos_token_id)
    return GenerationItem(tuple(backend.tokenizer.encode(context)), (*kwargs["until"], eos), kwargs["max_gen_toks"])


class _StaleSlot(decode.ContinuousDecoder):
    """A planted fault: a newcomer's row does not start clean; it sees the columns left of its own
    context (another row's place, or padding) as if they were its tokens."""

    def _join(self, rows, cache, mask, shared):
        if self.mask is not None and self.active:
            width = max(self.mask.shape[1], mask.shape[1])
            mask = F.pad(mask, (width - mask.shape[1], 0), value=1)
        super()._join(rows, cache, mask, shared)


def test_a_newcomer_seeing_a_stale_slot_is_caught(backend, lm_eval_hf, monkeypatch):
    requests = _requests(backend)
    theirs = _theirs(lm_eval_hf, requests)
    monkeypatch.setattr(backend, "decoder", lambda *limits: _StaleSlot(backend, *limits))
    assert _ours(backend, requests) != theirs


def test_a_shared_prefix_generates_what_the_whole_prompts_do(backend, monkeypatch):
    """Few-shot prompts (one of them the prefix alone) prefilled with the prefix once equal the same
    prompts prefilled whole; the prefix is checked against whole prompts once, and a prefix whose
    scores disagree (a planted wrong position) turns sharing off, with the texts still right."""
    prompts = [SHOTS + f"Q: {a} + {b} = ?\nA:" for a, b in [(1, 2), (30, 4), (7, 70), (99, 1)]] + [SHOTS]
    items = [GenerationItem(tuple(backend.tokenizer.encode(p)), ("\n\n", "@@"), 24) for p in prompts]
    whole = backend.generate_static(items)
    calls: list[int] = []
    real = backend._prefix_cache
    monkeypatch.setattr(backend, "_prefix_cache", lambda tokens, rows: calls.append(len(tokens)) or real(tokens, rows))
    monkeypatch.setattr(backend, "generation_prefix_checked", False)
    got: dict[int, str] = {}
    backend.decoder(len(items), 10**6).run(items, got.__setitem__)
    assert calls and calls[0] >= decode.MIN_SHARED_PREFIX and backend.reuse_prefixes
    assert backend.generation_prefix_checked
    assert [got[k] for k in range(len(items))] == whole

    monkeypatch.setattr(backend, "generation_prefix_checked", False)
    monkeypatch.setattr(backend, "_prefix_cache", lambda tokens, rows: _shifted(real, tokens, rows))
    got.clear()
    backend.decoder(len(items), 10**6).run(items, got.__setitem__)
    assert not backend.reuse_prefixes, "a prefix that changes the scores was kept"
    assert [got[k] for k in range(len(items))] == whole
    backend.reuse_prefixes = True


def _shifted(real, tokens, rows):
    """The prefix's cache computed one token short and padded back: wrong keys where the prompt's start should be."""
    cache = real(tokens[1:], rows)
    for layer in cache.layers:
        layer.keys = F.pad(layer.keys, (0, 0, 1, 0))
        layer.values = F.pad(layer.values, (0, 0, 1, 0))
    return cache


def test_out_of_memory_halves_the_budget_and_loses_no_finished_row(backend, monkeypatch):
    """An allocation failure mid-stream, after the first batch's rows are done: that batch is
    reported once, before the failure; the rest are decoded again under half the room, and every
    batch is reported exactly once with the static texts."""
    limits = [1, 2, 1, 2, 12, 12, 12, 12, 3, 12, 12, 12]
    items = [GenerationItem(tuple(backend.tokenizer.encode(SHOTS + f"Q: {n} + 1 = ?\nA:")), ("@@",), limit)
             for n, limit in enumerate(limits)]
    whole = backend.generate_static(items)
    real = decode.ContinuousDecoder._forward
    reported: list[tuple[int, list[str]]] = []
    reported_before_failure: list[int] = []

    def failing(self, *args):
        if reported and not reported_before_failure:  # the first forward pass after a batch was done
            reported_before_failure.extend(index for index, _ in reported)
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real(self, *args)

    monkeypatch.setattr(decode.ContinuousDecoder, "_forward", failing)
    runner = InProcessRunner(backend, "cpu")
    runner.run([items[:4], items[4:8], items[8:]], lambda index, texts: reported.append((index, texts)))
    assert runner.oom_halvings == 1 and runner.token_budget is not None
    assert reported_before_failure == [0]
    assert sorted(index for index, _ in reported) == [0, 1, 2]
    assert [text for _, texts in sorted(reported) for text in texts] == whole


def test_sampled_rows_draw_what_static_batches_draw(backend):
    """Seeded sampling rows beside greedy ones: each row's draw is its own, as in `generate`."""
    context = tuple(backend.tokenizer.encode(SHOTS + "Q: 8 + 8 = ?\nA:"))
    items = [GenerationItem(context, ("\n\n",), 16, (("seed", seed), ("temperature", 2.5), ("top_k", 50))) for seed in range(8)]
    items.insert(3, GenerationItem(context, ("\n\n",), 16))
    got: dict[int, str] = {}
    backend.decoder(3, 10**6).run(items, got.__setitem__)
    assert [got[k] for k in range(len(items))] == backend.generate_static(items)
    assert len(set(got.values())) > 1  # the seeds draw different texts


def test_models_that_change_scores_decode_with_generate(model_path):
    """A generation config with a repetition penalty (score-changing) keeps `generate`'s own batches."""
    loaded = HFBackend.load(model_path, device="cpu", dtype="float32")
    loaded.model.generation_config.repetition_penalty = 1.3
    penalized = HFBackend(loaded.model, loaded.tokenizer, "cpu", continuous=True)
    assert loaded.continuous and not penalized.continuous
    item = GenerationItem(tuple(loaded.tokenizer.encode(SHOTS)), ("@@",), 20)
    assert penalized.generate([item]) == [loaded.tokenizer.decode(_penalized(loaded, item), skip_special_tokens=True)]


def _penalized(loaded: HFBackend, item: GenerationItem) -> list[int]:
    out = loaded.model.generate(input_ids=torch.tensor([item.context]), max_new_tokens=20, do_sample=False,
                                pad_token_id=loaded.pad_id)
    return out[0, len(item.context):].tolist()


@pytest.mark.parametrize("held_once", [False, True])
def test_free_memory_bounds_the_rows_decoded_at_once(held_once, backend, monkeypatch):
    """Without a cache budget, the rows held at once are those whose KV cache fits CACHE_SHARE of the
    memory free at the start, in bytes per token measured on the first prefill; a few-shot prefix
    held once (cascade.py) counts once, so more rows fit than when each row holds it, and newcomers
    join the running rows as the early ones leave."""
    items = [GenerationItem(tuple(backend.tokenizer.encode(SHOTS + f"Q: {n} + 2 = ?\nA:")), ("@@",), 2 if n % 2 else 8)
             for n in range(12)]
    whole = backend.generate_static(items)
    backend.decoder(12, 10**6).run(items[:2], lambda *_: None)  # measures a cached token's bytes, checks the prefix
    if not held_once:
        monkeypatch.setattr(backend, "cascade", False)
    per_row = len(items[0].context) + 8  # one row's cache: its context and its token limit
    monkeypatch.setattr(decode, "free_memory", lambda device: int(3 * per_row * backend.cache_token_bytes / decode.CACHE_SHARE))
    held: list[int] = []
    joined: list[int] = []  # the rows already running at each prefill
    step, prefill = decode.ContinuousDecoder._step, decode.ContinuousDecoder._prefill
    monkeypatch.setattr(decode.ContinuousDecoder, "_step", lambda self: held.append(len(self.active)) or step(self))
    monkeypatch.setattr(decode.ContinuousDecoder, "_prefill", lambda self, rows: joined.append(len(self.active)) or prefill(self, rows))
    got: dict[int, str] = {}
    decoder = backend.decoder(12, 10**6)
    decoder.run(items, got.__setitem__)
    prefix = decoder._prefix_to_share(decode.shared_prefix_length([item.context for item in items]), [item.context for item in items])
    once = prefix if held_once else 0  # n rows take n times their longest part after the prefix, and the prefix once
    fits = max(n for n in range(1, 13)
               if n * max(len(item.context) - once + item.max_new_tokens for item in items[:n]) + once <= 3 * per_row)
    assert max(held) == fits and (fits > 3) == held_once
    assert any(joined), "no newcomer joined running rows"
    assert [got[k] for k in range(len(items))] == whole


@pytest.fixture(scope="module")
def metaspace_backend(tmp_path_factory) -> HFBackend:
    """A random Llama whose tokenizer drops a word's leading space when the word is decoded alone
    (SentencePiece's Metaspace), as Llama's and Mistral's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer, trained.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trained.train_from_iterator([SHOTS * 3, "the cat sat on the mat 1 2 3 4 5 6 7 8 9 0 x"],
                                trainer=trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<pad>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=trained, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    assert tokenizer.decode(tokenizer.encode("the cat")[-1:]) == "cat"  # the space goes when decoded alone
    folder = tmp_path_factory.mktemp("metaspace")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return HFBackend.load(str(folder), device="cpu", dtype="float32", share_prefixes=True)


@pytest.mark.parametrize("which", ["model's", "metaspace"])
def test_rows_leave_at_the_step_their_stop_string_appears(which, backend, metaspace_backend, monkeypatch):
    """Only rows whose new token may complete a stop string have their last tokens decoded each step;
    the rows leave at the same steps as when every row's window is decoded every step, a stop that
    is a single space included (a tokenizer that drops a word's leading space when it stands alone)."""
    loaded = backend if which == "model's" else metaspace_backend
    items = [_item(loaded, context, kwargs) for context, kwargs in _requests(loaded)]

    def decoded(every_window: bool) -> tuple[int, int, list[str]]:
        with monkeypatch.context() as patch:
            if every_window:
                patch.setattr(decode.ContinuousDecoder, "_may_stop", lambda self, row: True)
            steps, rows, got = loaded.decode_steps, loaded.decoded_rows, {}
            loaded.decoder(8, 8 * 200, 8 * 200).run(items, got.__setitem__)
        return loaded.decode_steps - steps, loaded.decoded_rows - rows, [got[k] for k in range(len(items))]

    everything = decoded(every_window=True)
    assert decoded(every_window=False) == everything
    assert any(" " in item.until for item in items) and any(text for text in everything[2])
