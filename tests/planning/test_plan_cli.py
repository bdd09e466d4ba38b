"""`evalfleet plan`: JSON for programs, tables for people, one sentence and an exit code for mistakes."""

from __future__ import annotations

import json

import pytest
from clitools import run_main, run_subprocess


def test_json_plan(capsys, monkeypatch):
    code, out, err = run_main(
        ["plan", "--model", "meta-llama/Llama-2-70b-hf", "--gpus", "8xA100-80GB", "--json"], capsys, monkeypatch
    )
    assert code == 0, err
    document = json.loads(out)
    assert document["model"]["params"] == 68_976_648_192 and document["fits"] is True
    assert document["tp"] >= 2 and document["engine"] == "distributed"
    assert len(document["placement"]) == document["gpus_used"] == 8
    assert document["gpus"] == "8xA100-80GB"


def test_options_reach_the_planner(capsys, monkeypatch):
    args = [
        "plan",
        "--model",
        "meta-llama/Llama-2-7b-hf",
        "--gpus",
        "2x8xH100-80GB",
        "--dtype",
        "float32",
        "--max-length",
        "1024",
        "--batch-size",
        "4",
        "--strategy",
        "tp",
        "--tp",
        "2",
        "--dp",
        "3",
        "--json",
    ]
    code, out, err = run_main(args, capsys, monkeypatch)
    assert code == 0, err
    document = json.loads(out)
    assert (document["strategy"], document["tp"], document["pp"], document["dp"]) == ("tp", 2, 1, 3)
    assert (document["model"]["dtype"], document["max_length"], document["batch_size"]) == ("float32", 1024, 4)


def test_table_for_people(capsys, monkeypatch):
    code, out, _ = run_main(["plan", "--model", "meta-llama/Llama-2-70b-hf", "--gpus", "8xA100-80GB"], capsys, monkeypatch)
    assert code == 0
    for text in ("68,976,648,192", "LlamaForCausalLM", "memory per GPU", "placement", "alternatives", "fits",
                 "on transformers"):
        assert text in out


def test_model_that_cannot_fit_exits_1_with_one_sentence(capsys, monkeypatch):
    code, out, err = run_main(
        ["plan", "--model", "meta-llama/Llama-3.1-405B", "--gpus", "8xH100-80GB", "--json"], capsys, monkeypatch
    )
    assert code == 1
    assert json.loads(out)["fits"] is False
    assert err.startswith("error: needs ") and err.strip().endswith("the largest GPU has 80 GB")
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "nobody/nothing", "--gpus", "8xA100-80GB"], "unknown model 'nobody/nothing'"),
        (["--model", "gpt2", "--gpus", "8xFOO"], "unknown GPU 'FOO'"),
        (["--model", "gpt2", "--gpus", "8xA100-80GB", "--strategy", "zigzag"], "unknown strategy 'zigzag'"),
        (["--model", "gpt2", "--gpus", "8xA100-80GB", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    ],
)
def test_bad_input_exits_2_with_one_sentence(capsys, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_main(["plan", *args], capsys, monkeypatch)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_config_without_needed_fields(capsys, monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    code, _, err = run_main(["plan", "--model", str(tmp_path), "--gpus", "cpu"], capsys, monkeypatch)
    assert code == 2 and "lacks the field 'num_hidden_layers'" in err


def test_default_gpus_is_this_machine(capsys, monkeypatch):
    from evalfleet.planning import Inventory, hardware

    monkeypatch.setattr(hardware.Inventory, "detect", classmethod(lambda cls: Inventory.cpu(total_gb=16, free_gb=12)))
    code, out, err = run_main(["plan", "--model", "gpt2", "--json"], capsys, monkeypatch)
    assert code == 0, err
    document = json.loads(out)
    assert document["strategy"] == "single" and document["engine"] == "lightweight"
    assert document["gpus"] == "cpu" and document["placement"] == [[0, 0]]


def test_real_command_in_a_subprocess():
    result = run_subprocess(
        ["plan", "--model", "mistralai/Mixtral-8x7B-v0.1", "--gpus", "8xH100-80GB", "--json"], timeout=120
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["model"]["params"] == 46_702_792_704 and document["fits"]


def test_bundled_demo_model(capsys, monkeypatch):
    code, out, err = run_main(["plan", "--model", "demo", "--gpus", "1xL4", "--json"], capsys, monkeypatch)
    assert code == 0, err
    document = json.loads(out)
    assert document["fits"] and document["engine"] == "lightweight" and document["model"]["params"] > 0
