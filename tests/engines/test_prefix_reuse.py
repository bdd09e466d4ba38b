"""Prefix reuse across requests: few-shot prompts share their examples, computed once.

Per-sample results must equal lm-eval's `hf` backend on an MMLU-shaped few-shot task
(`first_n` sampler, single-token answers), a multi-token multiple-choice few-shot task and a
rolling perplexity task, whatever the batch size; a wrong position offset after the shared
prefix must show up as a disagreement.
"""

from __future__ import annotations

import json
import random

import pytest

from evalfleet.engines.lightweight import LightweightEvaluationEngine
from evalfleet.runtime.backends.hf import HFBackend
from evalfleet.types import EvaluationRequest
from samples import compare_samples, load_samples
from tinymodels import build_tiny_model

WORDS = "apple river stone light green quiet north table music winter seven garden".split()
TASKS = ["fs_letters", "fs_phrases", "demo_ppl"]
SHOTS = 3


def _rows(rng: random.Random, n: int) -> list[dict]:
    return [
        {"question": " ".join(rng.choices(WORDS, k=rng.randint(3, 12))),
         "options": [" ".join(rng.choices(WORDS, k=rng.randint(1, 4))) for _ in range(4)], "gold": rng.randrange(4)}
        for _ in range(n)
    ]


def _task(folder, name: str, choices: str, text: str) -> None:
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    train: {folder / 'train.jsonl'}\n    test: {folder / 'test.jsonl'}\n"
        "output_type: multiple_choice\ntraining_split: train\ntest_split: test\nfewshot_split: train\n"
        f"num_fewshot: {SHOTS}\nfewshot_config:\n  sampler: first_n\n"
        f'doc_to_text: "{text}"\ndoc_to_choice: {choices}\ndoc_to_target: gold\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )


@pytest.fixture(scope="module")
def few_shot_tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("few-shot-tasks")
    rng = random.Random(21)
    (folder / "train.jsonl").write_text("\n".join(map(json.dumps, _rows(rng, 8))))
    (folder / "test.jsonl").write_text("\n".join(map(json.dumps, _rows(rng, 14))))
    # MMLU's shape: the question, lettered options, a single-token letter as the answer.
    _task(folder, "fs_letters", '["A", "B", "C", "D"]',
          "Q: {{question}}\\nA. {{options[0]}}\\nB. {{options[1]}}\\nC. {{options[2]}}\\nD. {{options[3]}}\\nAnswer:")
    _task(folder, "fs_phrases", "options", "Q: {{question}}\\nAnswer:")
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", family="llama", seed=5, max_positions=512)


@pytest.fixture(scope="module")
def reference(llama, few_shot_tasks):
    from lm_eval import simple_evaluate

    from evalfleet.engines.evaluation import BOOTSTRAP_ITERS
    from evalfleet.tasks import build_task_manager

    out = simple_evaluate(
        model="hf", model_args={"pretrained": str(llama), "dtype": "float32"}, tasks=TASKS,
        task_manager=build_task_manager(TASKS, str(few_shot_tasks)), batch_size=4, device="cpu", limit=12,
        log_samples=True, bootstrap_iters=BOOTSTRAP_ITERS,
    )
    return {task: json.loads(json.dumps(rows, default=str)) for task, rows in out["samples"].items()}


def _evaluate(llama, few_shot_tasks, folder, **options) -> dict:
    request = EvaluationRequest.model_validate({
        "model": {"path": str(llama), "dtype": "float32", "device": "cpu"},
        "tasks": {"names": TASKS, "include_path": str(few_shot_tasks), "limit": 12},
        "output_dir": str(folder), "log_samples": True, "use_cache": False, **options,
    })
    LightweightEvaluationEngine().evaluate_sync(request)
    return load_samples(folder)


@pytest.fixture
def prefix_calls(monkeypatch):
    """Counts the shared prefixes computed, so a test knows reuse really happened."""
    calls = []
    original = HFBackend._prefix_cache

    def counting(self, tokens, rows):
        calls.append((len(tokens), rows))
        return original(self, tokens, rows)

    monkeypatch.setattr(HFBackend, "_prefix_cache", counting)
    return calls


@pytest.mark.parametrize("options", [{"max_batch_tokens": 900}, {"batch_size": 3}, {"batch_size": 16, "max_batch_tokens": 4096}])
def test_prefix_reuse_equals_lm_eval_at_any_batch_size(llama, few_shot_tasks, reference, prefix_calls, tmp_path, options):
    samples = _evaluate(llama, few_shot_tasks, tmp_path, **options)
    assert compare_samples(reference, samples) == []
    assert prefix_calls and all(length >= 16 for length, _ in prefix_calls)
    assert any(rows > 1 for _, rows in prefix_calls)


def test_a_wrong_position_offset_after_the_prefix_is_caught(llama, few_shot_tasks, reference, monkeypatch, tmp_path):
    """Plant the fault: positions after the shared prefix start one too late (the guard is skipped)."""
    monkeypatch.setattr(HFBackend, "_position_offset", lambda self, prefix: prefix + 1)
    monkeypatch.setattr(HFBackend, "_packing_agrees", lambda self, items, packed, prefix: True)
    problems = compare_samples(reference, _evaluate(llama, few_shot_tasks, tmp_path, max_batch_tokens=900))
    assert problems and all(task.startswith("fs_") for task in (p.split("#")[0] for p in problems))
