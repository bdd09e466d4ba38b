"""A user's own task folder (few-shot, several stop strings, a custom delimiter) on a Qwen2 model:
evalfleet's per-sample results equal lm-eval's `hf` backend."""

from __future__ import annotations

import json
import random

import pytest

from tinymodels import build_tiny_model
from evalfleet.engines.lightweight import LightweightEvaluationEngine
from evalfleet.types import EvaluationRequest
from samples import compare_samples, load_samples, metric_differences

WORDS = "apple river stone light green quiet north table music winter seven garden".split()


@pytest.fixture(scope="module")
def user_tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user-tasks")
    rng = random.Random(3)
    pick = [{"premise": " ".join(rng.choices(WORDS, k=rng.randint(3, 25))), "options": [" ".join(rng.choices(WORDS, k=rng.randint(1, 4))) for _ in range(3)], "gold": rng.randrange(3)} for _ in range(24)]
    (folder / "pick.jsonl").write_text("\n".join(map(json.dumps, pick)))
    echo = [{"prompt": " ".join(rng.choices(WORDS, k=rng.randint(2, 30))), "answer": rng.choice(WORDS)} for _ in range(16)]
    (folder / "echo.jsonl").write_text("\n".join(map(json.dumps, echo)))
    (folder / "pick.yaml").write_text(
        f"task: user_pick\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'pick.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\nfewshot_split: test\n"
        'doc_to_text: "Premise: {{premise}}\\nAnswer:"\ndoc_to_choice: options\ndoc_to_target: gold\n'
        'target_delimiter: " => "\nfewshot_delimiter: "\\n\\n"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "echo.yaml").write_text(
        f"task: user_echo\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'echo.jsonl'}\n"
        "output_type: generate_until\ntest_split: test\n"
        'doc_to_text: "Say: {{prompt}} ->"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n", " river", "."]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return folder


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", family="qwen2", seed=11, max_positions=512)


def test_user_tasks_with_fewshot_match_lm_eval(qwen_model, user_tasks, tmp_path):
    from lm_eval import simple_evaluate

    from evalfleet.engines.evaluation import BOOTSTRAP_ITERS
    from evalfleet.tasks import build_task_manager

    tasks = ["user_pick", "user_echo"]
    reference = simple_evaluate(
        model="hf", model_args={"pretrained": str(qwen_model), "dtype": "float32"}, tasks=tasks,
        task_manager=build_task_manager(tasks, str(user_tasks)), batch_size=5, device="cpu", num_fewshot=2,
        log_samples=True, bootstrap_iters=BOOTSTRAP_ITERS,
    )
    request = EvaluationRequest.model_validate({
        "model": {"path": str(qwen_model), "dtype": "float32", "device": "cpu"},
        "tasks": {"names": tasks, "include_path": str(user_tasks), "num_fewshot": 2},
        "output_dir": str(tmp_path), "log_samples": True, "use_cache": False,
    })
    result = LightweightEvaluationEngine().evaluate_sync(request)
    expected = {task: json.loads(json.dumps(rows, default=str)) for task, rows in reference["samples"].items()}
    assert compare_samples(expected, load_samples(tmp_path)) == []
    assert metric_differences(reference, result.results) == []
    assert result.results["n-shot"] == {"user_pick": 2, "user_echo": 2}
