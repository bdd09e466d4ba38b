"""A job's size, counted at submit without the model, is exactly what its run computes."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from evalfleet.engines import job_size as size_module
from evalfleet.engines.job_size import job_size
from evalfleet.tasks import DEMO_TASKS_DIR
from evalfleet.types import EvaluationRequest, UsageError

DEMO = ["demo_mc", "demo_arith", "demo_ppl"]
WORDS = "apple river stone light green quiet north table music winter".split()


@pytest.fixture(autouse=True)
def own_sizes(tmp_path, monkeypatch):
    """Counts of this module's own, so every test starts from nothing kept."""
    monkeypatch.setenv("EVALFLEET_SIZES", str(tmp_path / "sizes"))


def _request(tmp_path, names, **tasks) -> EvaluationRequest:
    return EvaluationRequest.model_validate({
        "model": {"path": tasks.pop("model", "demo")}, "tasks": {"names": names, **tasks},
        "cache_path": str(tmp_path / "cache.sqlite"), "use_cache": False,
    })


@pytest.fixture
def user_tasks(tmp_path):
    """Few-shot multiple choice (5 choices), and generation asked twice per document (`repeats`)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    rng = random.Random(2)
    rows = [{"q": " ".join(rng.choices(WORDS, k=rng.randint(3, 12))), "options": rng.sample(WORDS, 5),
             "gold": rng.randrange(5)} for _ in range(9)]
    (folder / "pick.jsonl").write_text("\n".join(map(json.dumps, rows)))
    (folder / "pick.yaml").write_text(
        f"task: size_pick\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'pick.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\nfewshot_split: test\nnum_fewshot: 2\n"
        'doc_to_text: "Q: {{q}}\\nA:"\ndoc_to_choice: options\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n')
    (folder / "say.yaml").write_text(
        f"task: size_say\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'pick.jsonl'}\n"
        "output_type: generate_until\ntest_split: test\nrepeats: 2\n"
        'doc_to_text: "Say {{q}}:"\ndoc_to_target: "{{q}}"\n'
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 7\n  do_sample: false\n"
        "filter_list:\n  - name: first\n    filter:\n      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder


def _lines(name: str) -> int:
    return sum(1 for line in (DEMO_TASKS_DIR / f"{name}.jsonl").read_text().splitlines() if line.strip())


def test_the_demo_tasks_count_one_request_per_choice_document_and_text(tmp_path):
    size = job_size(_request(tmp_path, DEMO))
    choices = sum(len(json.loads(line)["choices"]) for line in (DEMO_TASKS_DIR / "demo_mc.jsonl").read_text().splitlines())
    assert size["source"] == "counted" and size["kept"] is False
    assert size["requests_by_type"] == {"loglikelihood": choices, "generate_until": _lines("demo_arith"),
                                        "loglikelihood_rolling": _lines("demo_ppl")}
    assert size["requests"] == choices + _lines("demo_arith") + _lines("demo_ppl")
    arith = json.loads((DEMO_TASKS_DIR / "demo_arith.yaml").read_text().split("max_gen_toks:")[1].split()[0])
    assert size["generation_tokens"] == _lines("demo_arith") * arith
    assert size["work_tokens"] == size["prompt_tokens"] + size["generation_tokens"] > size["requests"]


@pytest.mark.parametrize("names,options", [
    (DEMO, {"limit": 12}),
    (["size_pick", "size_say"], {}),
    (["size_pick"], {"num_fewshot": 0, "limit": 5}),
])
def test_the_size_is_what_the_run_computes(tmp_path, user_tasks, names, options):
    """Requests by type exactly as lm-eval hands them to the model, and the tokens the run computes."""
    from evalfleet.engines.run import evaluate_request

    request = _request(tmp_path, names, include_path=str(user_tasks), **options)
    size = job_size(request)
    timing = evaluate_request(request).evalfleet["timing"]
    assert size["source"] == "counted"
    assert size["requests"] == timing["requests"] and size["requests_by_type"] == timing["requests_by_type"]
    assert size["token_requests"] == timing["token_requests"] and size["work_tokens"] == timing["tokens"]
    if names == ["size_pick", "size_say"]:  # 9 documents: 5 choices each; generation asked twice each
        assert size["requests_by_type"] == {"loglikelihood": 45, "generate_until": 18}
        assert size["generation_tokens"] == 9 * 7  # the repeats are one request to compute


def test_a_second_count_is_read_back_and_an_edited_task_is_counted_again(tmp_path, user_tasks, monkeypatch):
    request = _request(tmp_path, ["size_pick"], include_path=str(user_tasks))
    first = job_size(request)

    def no_counting(request):
        raise AssertionError("counted again")

    with monkeypatch.context() as patched:
        patched.setattr(size_module, "count_request", no_counting)
        again = job_size(request)
    assert again["kept"] is True and {**again, "kept": False} == first
    rows = (user_tasks / "pick.jsonl").read_text().splitlines()
    (user_tasks / "pick.jsonl").write_text("\n".join(rows[:4]))  # the data file a task names by absolute path
    edited = job_size(request)
    assert edited["kept"] is False and edited["requests"] == 4 * 5


def test_a_model_without_local_files_is_modeled_and_says_why(tmp_path):
    size = job_size(_request(tmp_path, ["demo_mc"], model="meta-llama/Llama-2-7b-hf", limit=30))
    assert size == {"source": "modeled", "reason": "the model is not a local folder, so its tokenizer cannot be read here",
                    "model": size_module.MODELED, "work_tokens": 30 * 512.0}  # 30 requests of 512 tokens
    assert job_size(_request(tmp_path, ["demo_mc", "demo_arith"], model="org/model"))["work_tokens"] == 2 * 2000 * 512


def test_an_unknown_task_is_refused(tmp_path):
    with pytest.raises(UsageError, match="unknown task 'demo_mcc'; close names: demo_mc"):
        job_size(_request(tmp_path, ["demo_mcc"]))


def test_tasks_that_cannot_be_built_here_keep_the_modeled_size_with_the_reason(tmp_path):
    """A dataset that must come from the hub, on a machine without network: counted later, not refused."""
    from evalfleet.orchestrator.console import describe_size

    folder = tmp_path / "hub-tasks"
    folder.mkdir()
    (folder / "far.yaml").write_text(
        "task: size_far\ndataset_path: evalfleet-tests/not-on-this-machine\noutput_type: multiple_choice\n"
        'test_split: test\ndoc_to_text: "{{q}}"\ndoc_to_choice: ["a", "b"]\ndoc_to_target: 0\n')
    size = job_size(_request(tmp_path, ["size_far"], include_path=str(folder)))
    assert size["source"] == "modeled"
    assert size["reason"].startswith("the tasks could not be built here: ") and "not-on-this-machine" in size["reason"]
    assert not (tmp_path / "sizes").exists() or not list((tmp_path / "sizes").iterdir())  # nothing kept
    assert size["work_tokens"] == 2000 * 512  # one task, no limit
    assert describe_size(size) == f"1,024,000 tokens, modeled ({size['reason']})"


def test_checkpoints_that_share_a_tokenizer_share_a_count_and_another_tokenizer_does_not(tmp_path, monkeypatch):
    # A copy stands for a training run's next checkpoint: other paths, other modification times,
    # the same tokenizer; the count made for the first is read back for the second.
    from evalfleet.types import resolve_model_path

    demo = Path(resolve_model_path("demo"))
    step_1 = shutil.copytree(demo, tmp_path / "run" / "step-1")
    step_2 = shutil.copytree(demo, tmp_path / "run" / "step-2", copy_function=shutil.copy)  # new mtimes
    first = job_size(_request(tmp_path, ["demo_mc"], model=str(step_1)))

    def no_counting(request):
        raise AssertionError("counted again")

    with monkeypatch.context() as patched:
        patched.setattr(size_module, "count_request", no_counting)
        again = job_size(_request(tmp_path, ["demo_mc"], model=str(step_2)))
    assert again["kept"] is True and {**again, "kept": False} == first
    # Another tokenizer (a shorter model_max_length) is counted afresh.
    config = json.loads((step_2 / "tokenizer_config.json").read_text())
    config["model_max_length"] = 64
    (step_2 / "tokenizer_config.json").write_text(json.dumps(config))
    assert job_size(_request(tmp_path, ["demo_mc"], model=str(step_2)))["kept"] is False
