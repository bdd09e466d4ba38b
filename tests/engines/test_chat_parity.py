"""lm-eval's flags give lm-eval `hf`'s prompts and numbers, on an instruct-style model of our own.

Each run is set against lm-eval's `hf` backend with the same flags: equal `prompt_hash` per
sample (the prompt text itself), equal log-likelihoods and generations, equal metrics. The runs
go through the command line, packing and prefix reuse (the lightweight engine) and data
parallelism (worker groups); a planted fault that renders the question as a chat turn but
leaves the few-shot turns as plain text must be caught.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from chat_support import DEFAULT_TEMPLATE, TASKS, build_chat_model, build_chat_tasks, lm_eval_hf, prompt_hashes
from clitools import run_subprocess
from samples import compare_samples, load_samples, metric_differences

from evalfleet.engines.lightweight import LightweightEvaluationEngine
from evalfleet.engines.job_size import count_here
from evalfleet.runtime.backends.hf import HFBackend
from evalfleet.runtime.chat import render_chat
from evalfleet.runtime.lm import EvalfleetLM
from evalfleet.types import EvaluationRequest

SAMPLES = {"chat_pick": [0, 3, 7, 9], "chat_echo": [1, 2, 8]}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return build_chat_model(tmp_path_factory.mktemp("models") / "tiny-instruct")


@pytest.fixture(scope="module")
def chat_tasks(tmp_path_factory):
    return build_chat_tasks(tmp_path_factory.mktemp("chat-tasks"))


def _differences(reference: dict, samples: dict, results: dict) -> list[str]:
    """Every way a run differs from lm-eval's: prompts, per-sample numbers and texts, metrics."""
    ours, theirs = prompt_hashes(samples), prompt_hashes(reference["samples"])
    problems = [f"{key[0]}#{key[1]}: another prompt" for key in theirs if ours.get(key) != theirs[key]]
    problems += compare_samples(reference["samples"], samples)
    return problems + metric_differences(reference, results)


def _request(model_path, task_folder, out, **fields) -> EvaluationRequest:
    return EvaluationRequest.model_validate({
        "model": {"path": str(model_path), "dtype": "float32", "device": "cpu", **fields.pop("model", {})},
        "tasks": {"names": TASKS, "include_path": str(task_folder), "num_fewshot": 2, **fields.pop("tasks", {})},
        "output_dir": str(out), "log_samples": True, "use_cache": False, **fields,
    })


def _evaluate(model_path, task_folder, out, runner_engine=None, **fields):
    request = _request(model_path, task_folder, out, **fields)
    return asyncio.run((runner_engine or LightweightEvaluationEngine()).evaluate(request))


@pytest.fixture(scope="module")
def multiturn_reference(chat_model, chat_tasks):
    return lm_eval_hf(chat_model, TASKS, chat_tasks, apply_chat_template=True, fewshot_as_multiturn=True,
                      num_fewshot=2, limit=6, fewshot_random_seed=7, gen_kwargs={"max_gen_toks": 4})


def test_the_command_line_gives_lm_eval_prompts_and_scores(chat_model, chat_tasks, multiturn_reference, tmp_path):
    """lm-eval's own command line, `lm_eval --model hf` made `evalfleet run`: `--apply_chat_template` alone
    (few-shot turns follow), a few-shot seed and a generation override."""
    done = run_subprocess(
        ["run", "--model_args", f"pretrained={chat_model},dtype=float32", "--tasks", ",".join(TASKS),
         "--include_path", str(chat_tasks), "--num_fewshot", "2", "--limit", "6", "--apply_chat_template",
         "--seed", "0,1234,1234,7", "--gen_kwargs", "max_gen_toks=4", "--device", "cpu", "--log_samples",
         "--output_path", str(tmp_path), "--max-batch-tokens", "900"],
        env={"EVALFLEET_CACHE": str(tmp_path / "cache.sqlite")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads((tmp_path / "results.json").read_text())
    assert _differences(multiturn_reference, load_samples(tmp_path), document) == []
    settings = document["evalfleet"]["settings"]
    assert settings["fewshot_as_multiturn"] is True and settings["apply_chat_template"] is True
    assert settings["seeds"] == {"random": 0, "numpy": 1234, "torch": 1234, "fewshot": 7}
    assert settings["gen_kwargs"] == {"max_gen_toks": 4}
    from lm_eval.utils import hash_string

    assert document["chat_template_sha"] == settings["chat_template_sha"] == hash_string(DEFAULT_TEMPLATE)
    assert set(document["task_hashes"]) == set(TASKS)


def test_single_turn_few_shot_with_a_system_instruction_and_chosen_documents(chat_model, chat_tasks, tmp_path):
    """`--fewshot-as-multiturn false --system-instruction ... --samples ... --model-args max_length=512 --metadata`."""
    reference = lm_eval_hf(chat_model, TASKS, chat_tasks, {"max_length": 512}, apply_chat_template=True,
                           fewshot_as_multiturn=False, system_instruction="Answer briefly.", num_fewshot=2,
                           samples=SAMPLES, metadata={"max_length": 512, "note": "x"})
    fields = {"model": {"max_length": 512}, "harness": {
        "apply_chat_template": True, "fewshot_as_multiturn": False, "samples": SAMPLES,
        "system_instruction": "Answer briefly.", "metadata": {"max_length": 512, "note": "x"}}}
    result = _evaluate(chat_model, chat_tasks, tmp_path, **fields)
    assert _differences(reference, load_samples(tmp_path), result.results) == []
    assert result.results["configs"]["chat_pick"]["metadata"]["note"] == "x"
    # the size counted at submit is this run's: the same prompts, from the same settings
    size, timing = count_here(_request(chat_model, chat_tasks, tmp_path, **fields)), result.evalfleet["timing"]
    assert (size["requests"], size["token_requests"], size["work_tokens"]) == (
        timing["requests"], timing["token_requests"], timing["tokens"])


def test_a_named_template_that_rejects_system_turns_predicting_only(chat_model, chat_tasks, tmp_path):
    """`--apply-chat-template strict --system-instruction ... --predict-only`: the template refuses the
    system turn, so it is dropped, as lm-eval's `hf` does (which renders a named template when its
    `chat_template_args` name it; see docs/architecture.md)."""
    reference = lm_eval_hf(chat_model, TASKS, chat_tasks, {"chat_template_args": {"chat_template": "strict"}},
                           apply_chat_template="strict", fewshot_as_multiturn=True, system_instruction="Be brief.",
                           num_fewshot=2, limit=5, predict_only=True)
    results = _evaluate(chat_model, chat_tasks, tmp_path, tasks={"limit": 5},
                        harness={"apply_chat_template": "strict", "system_instruction": "Be brief.", "predict_only": True}).results
    samples = load_samples(tmp_path)
    assert _differences(reference, samples, results) == []
    assert all(row["arguments"][0][0].startswith("[user] ") for row in samples["chat_echo"])
    assert set(results["results"]["chat_echo"]) >= {"bypass,none"}


def test_a_chat_few_shot_prefix_is_computed_once_and_scores_as_lm_eval(chat_model, chat_tasks, monkeypatch, tmp_path):
    """Every prompt of chat_fixed opens with the same system and few-shot turns: a long shared prefix."""
    reference = lm_eval_hf(chat_model, ["chat_fixed"], chat_tasks, apply_chat_template=True, fewshot_as_multiturn=True,
                           num_fewshot=3, limit=8)
    prefixes = []
    original = HFBackend._prefix_cache
    monkeypatch.setattr(HFBackend, "_prefix_cache", lambda self, tokens, rows: prefixes.append(len(tokens)) or original(self, tokens, rows))
    result = _evaluate(chat_model, chat_tasks, tmp_path, tasks={"names": ["chat_fixed"], "limit": 8, "num_fewshot": 3},
                       harness={"apply_chat_template": True})
    assert _differences(reference, load_samples(tmp_path), result.results) == []
    assert prefixes and min(prefixes) >= 150  # the system and three few-shot turns (239 tokens), computed once


@pytest.mark.slow
def test_data_parallel_replicas_give_lm_eval_prompts_and_scores(chat_model, chat_tasks, multiturn_reference, tmp_path):
    from evalfleet.engines.distributed import DistributedEvaluationEngine

    engine = DistributedEvaluationEngine()
    try:
        result = _evaluate(chat_model, chat_tasks, tmp_path, engine, tasks={"limit": 6}, engine="distributed",
                           strategy="dp", dp=2, seed=[0, 1234, 1234, 7], harness={"apply_chat_template": True,
                           "gen_kwargs": {"max_gen_toks": 4}})
    finally:
        engine.shutdown()
    assert result.evalfleet["layout"]["dp"] == 2
    assert _differences(multiturn_reference, load_samples(tmp_path), result.results) == []


def test_few_shot_turns_left_out_of_the_template_are_caught(chat_model, chat_tasks, multiturn_reference, monkeypatch,
                                                            tmp_path):
    """Plant the fault: the question is a chat turn, the few-shot examples before it plain text."""

    def question_only(self, history, add_generation_prompt=True):
        keep = 1 if add_generation_prompt else 2
        system = [turn for turn in history if turn["role"] == "system"]
        turns = [turn for turn in history if turn["role"] != "system"]
        shots = "".join(turn["content"] for turn in turns[:-keep])
        return shots + render_chat(self.tokenizer, system + turns[-keep:], add_generation_prompt, self.template, {})

    monkeypatch.setattr(EvalfleetLM, "apply_chat_template", question_only)
    results = _evaluate(chat_model, chat_tasks, tmp_path, tasks={"limit": 6}, seed=[0, 1234, 1234, 7],
                        harness={"apply_chat_template": True, "gen_kwargs": {"max_gen_toks": 4}}).results
    problems = _differences(multiturn_reference, load_samples(tmp_path), results)
    assert sum("another prompt" in p for p in problems) == 12
