"""lm-eval's flags on `run` and `submit`: read as lm-eval reads them, kept in the job store, and bad
values refused in one sentence with exit code 2, at submit as at run."""

from __future__ import annotations

import json

import pytest
from chat_support import build_chat_model, build_chat_tasks
from clitools import run_main

from evalfleet.cli_options import lm_eval_command_line
from evalfleet.orchestrator import JobStore, slot_inventory
from evalfleet.orchestrator.pool import record_pool
from evalfleet.tasks.harness_args import request_fields
from evalfleet.types import EvaluationRequest


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return build_chat_model(tmp_path_factory.mktemp("models") / "tiny-instruct")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = build_chat_tasks(tmp_path_factory.mktemp("tasks"))
    text = (folder / "chat_echo.yaml").read_text().replace("task: chat_echo", "task: chat_unsafe")
    (folder / "chat_unsafe.yaml").write_text(text + "unsafe_code: true\n")
    return folder


@pytest.fixture
def store(tmp_path):
    with JobStore(tmp_path / "jobs.sqlite") as jobs:  # the autouse fixture points EVALFLEET_DB here
        record_pool(jobs, slot_inventory(2, memory_gb=4), max_attempts=3)
    return tmp_path / "jobs.sqlite"


def _cases(chat_model, plain_model, tasks) -> list[tuple[list[str], str]]:
    chat = ["--model", str(chat_model), "--tasks", "chat_pick", "--include-path", str(tasks)]
    plain = ["--model", str(plain_model), "--tasks", "demo_mc"]
    return [
        ([*chat, "--apply-chat-template", "nosuch", "--limit", "1"], "no chat template named 'nosuch' (it has: default, strict)"),
        ([*plain, "--apply-chat-template", "--limit", "1"], "has no chat template; run without --apply-chat-template"),
        ([*plain, "--fewshot-as-multiturn"], "--fewshot-as-multiturn: few-shot examples as chat turns need a chat template"),
        ([*plain, "--gen-kwargs", "temperature"], "--gen-kwargs: expected `key=value`, got 'temperature'"),
        ([*plain, "--gen-kwargs", "num_beams=4"], "--gen-kwargs: 'num_beams' is not a generation setting evalfleet applies"),
        ([*plain, "--gen-kwargs", '{"top_p": 2'], "--gen-kwargs: Invalid JSON"),
        ([*plain, "--model-args", "revision"], "--model-args: expected `key=value`"),
        ([*plain, "--model-args", "load_in_8bit=True"], "--model-args: evalfleet does not apply 'load_in_8bit'"),
        ([*plain, "--model-args", "pretrained=gpt2"], "--model-args: pretrained=gpt2 names another model than --model"),
        ([*plain, "--model-args", "dtype=float32", "--dtype", "bfloat16"], "--model-args: dtype=float32 disagrees with --dtype bfloat16"),
        ([*plain, "--model-args", "max_length=-5"], "--model-args: input should be greater than 0"),
        ([*plain, "--seed", "1,2"], "--seed: Argument requires 4 integers or None"),
        ([*plain, "--samples", "not-json"], "--samples: 'not-json' is neither a JSON object nor a JSON file"),
        ([*plain, "--samples", '{"demo_mc": [1]}', "--limit", "2"], "give either document ids (samples) or a limit"),
        ([*plain, "--samples", '{"demo_mc": [3, 300]}'], "--samples: demo_mc has 300 documents (ids 0 to 299); 300 is not one of them"),
        ([*plain, "--samples", '{"demo_ppl": [1]}'], "--samples names 'demo_ppl', which is not a task of this run (demo_mc)"),
        (["--model", str(plain_model), "--tasks", "chat_unsafe", "--include-path", str(tasks), "--limit", "1"],
         "task 'chat_unsafe' runs code the model writes; add --confirm-run-unsafe-code to run it"),
    ]


def test_bad_lm_eval_flags_are_refused_at_run_and_at_submit(chat_model, tiny_model, tasks, store, capsys, monkeypatch):
    for args, message in _cases(chat_model, tiny_model, tasks):
        for command in ("run", "submit"):
            code, _, err = run_main([command, *args], capsys, monkeypatch)
            assert (code, message in err) == (2, True), (command, args, err)
            # one sentence, last (a task's first load may print the datasets library's progress first)
            assert err.strip().splitlines()[-1] == f"error: {err.split('error: ')[1].strip()}" and "Traceback" not in err, err
    with JobStore(store) as jobs:
        assert jobs.list() == []


def test_submit_keeps_the_settings_in_the_job_store(chat_model, tasks, store, capsys, monkeypatch):
    code, out, err = run_main(
        ["submit", "--model", str(chat_model), "--tasks", "chat_sampled,chat_unsafe", "--include-path", str(tasks),
         "--apply-chat-template", "strict", "--fewshot-as-multiturn", "false", "--system-instruction", "Be brief.",
         "--gen-kwargs", 'temperature=0.7,until=["\\n\\n"]', "--seed", "5", "--model-args", "max_length=512,enable_thinking=False",
         "--samples", '{"chat_sampled": [2, 0]}', "--confirm-run-unsafe-code", "--predict-only", "--metadata", '{"k": [1, 2]}'],
        capsys, monkeypatch)
    assert code == 0, err
    with JobStore(store) as jobs:
        request = EvaluationRequest.model_validate(jobs.get(out.strip()).request)
    harness = request.harness
    assert (harness.apply_chat_template, harness.fewshot_as_multiturn, harness.system_instruction) == ("strict", False, "Be brief.")
    assert harness.gen_kwargs == {"temperature": 0.7, "until": ["\n\n"]}
    assert harness.samples == {"chat_sampled": [0, 2]} and harness.predict_only and harness.confirm_run_unsafe_code
    assert harness.metadata == {"max_length": 512, "enable_thinking": False, "k": [1, 2]}  # model args merged, as lm-eval does
    assert request.seed == (5, 5, 5, 5)
    assert request.model.max_length == 512 and request.model.chat_template_args == {"enable_thinking": False}
    assert "size: " in err and "counted" in err.splitlines()[0]  # counted with the template and the chosen documents


def test_flags_read_as_lm_eval_reads_them(tmp_path):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps({"demo_mc": [4, 1]}))
    fields = request_fields(model={"path": "demo", "dtype": "auto"}, apply_chat_template="", gen_kwargs="do_sample=true,top_k=5",
                            seed="1,None,3", samples=str(ids), model_args='{"revision": "v2", "add_bos_token": true}')
    request = EvaluationRequest.model_validate({**fields, "tasks": {"names": "demo_mc"}})
    assert request.harness.apply_chat_template is True and request.harness.multiturn  # on with the template
    assert request.harness.gen_kwargs == {"do_sample": True, "top_k": 5}
    assert request.seed == (1, None, 3, 1234)  # lm-eval fills a missing few-shot seed with its default
    assert request.harness.samples == {"demo_mc": [1, 4]}
    assert (request.model.revision, request.model.add_bos_token) == ("v2", True)
    assert EvaluationRequest.model_validate({"model": {"path": "demo"}, "tasks": {"names": "demo_mc"}}).seed == (0, 1234, 1234, 1234)
    assert EvaluationRequest.model_validate({"model": {"path": "demo"}, "tasks": {"names": "demo_mc"}, "seed": 1234}).seed == (1234,) * 4


def test_bare_flags_and_lm_eval_spellings_take_lm_eval_meaning():
    assert lm_eval_command_line(["run", "--apply-chat-template", "--fewshot_as_multiturn"]) == [
        "run", "--apply-chat-template=", "--fewshot-as-multiturn=true"]
    assert lm_eval_command_line(["submit", "--apply_chat_template", "chatml", "--fewshot-as-multiturn", "false",
                                 "--output_path=out"]) == [
        "submit", "--apply-chat-template", "chatml", "--fewshot-as-multiturn", "false", "--output=out"]
    assert lm_eval_command_line(["plan", "--batch_size", "4"]) == ["plan", "--batch_size", "4"]  # run and submit only


def test_an_lm_eval_command_line_works_as_typed(chat_model, tasks, store, capsys, monkeypatch):
    """`lm_eval --model hf --model_args pretrained=... ...` with `lm_eval --model hf` changed to `evalfleet submit`."""
    code, out, err = run_main(
        ["submit", "--model_args", f"pretrained={chat_model},dtype=float32", "--tasks", "chat_pick,chat_echo",
         "--include_path", str(tasks), "--num_fewshot", "2", "--apply_chat_template", "--fewshot_as_multiturn", "false",
         "--system_instruction", "Be brief.", "--gen_kwargs", "max_gen_toks=5", "--log_samples", "--batch_size", "4",
         "--seed", "1,2,3,4", "--predict_only"], capsys, monkeypatch)
    assert code == 0, err
    with JobStore(store) as jobs:
        request = EvaluationRequest.model_validate(jobs.get(out.strip()).request)
    assert (request.model.path, request.model.dtype) == (str(chat_model), "float32")
    assert request.tasks.num_fewshot == 2 and request.log_samples and request.batch_size == 4
    assert request.harness.apply_chat_template is True and request.harness.fewshot_as_multiturn is False
    assert request.harness.system_instruction == "Be brief." and request.harness.gen_kwargs == {"max_gen_toks": 5}
    assert request.seed == (1, 2, 3, 4) and request.harness.predict_only
    code, _, err = run_main(["submit", "--tasks", "demo_mc"], capsys, monkeypatch)
    assert code == 2 and "name the model with --model PATH (or --model-args pretrained=PATH)" in err
