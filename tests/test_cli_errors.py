"""Bad input gets one clear sentence on stderr, exit 2 for usage errors and 1 for runtime errors."""

from __future__ import annotations

import pytest

from clitools import run_main, run_subprocess


@pytest.fixture
def bad_yaml_folder(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    return folder


def _cases(tiny_model, tmp_path, bad_yaml_folder):
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    model = str(tiny_model)
    return [
        (["run", "--model", str(tmp_path / "missing")], 2, "does not exist"),
        (["run", "--model", str(no_weights)], 2, "no weights"),
        (["run", "--model", model, "--tasks", "demo_mcc"], 2, "unknown task 'demo_mcc'; close names: demo_mc"),
        (["run", "--model", model, "--tasks", "demo_mc", "--include-path", str(bad_yaml_folder)], 2, "broken.yaml' is malformed"),
        (["run", "--model", model, "--include-path", str(tmp_path / "nope")], 2, "does not exist"),
        (["run", "--model", model, "--limit", "0"], 2, "--limit: input should be greater than 0"),
        (["run", "--model", model, "--limit", "-3"], 2, "--limit"),
        (["run", "--model", model, "--dtype", "float16", "--device", "cpu"], 2, "float16 is not supported on the CPU"),
        (["run", "--model", model, "--dtype", "float8"], 2, "--dtype"),
        (["run", "--model", model, "--device", "cuda"], 2, "no CUDA GPU"),
        (["run", "--model", model, "--batch-size", "many"], 2, "--batch-size"),
        (["run", "--model", model, "--tasks", "demo_mc", "--limit", "1", "--output", str(blocker / "out")], 1, "cannot create output folder"),
    ]


def test_each_bad_input_has_its_message_and_exit_code(tiny_model, tmp_path, bad_yaml_folder, capsys, monkeypatch):
    for args, code, message in _cases(tiny_model, tmp_path, bad_yaml_folder):
        exit_code, _, err = run_main(args, capsys, monkeypatch)
        assert (exit_code, message in err) == (code, True), (args, exit_code, err)
        assert "Traceback" not in err
        assert err.strip().count("\n") == 0, err


def test_a_real_process_prints_one_line_without_traceback(tmp_path):
    done = run_subprocess(["run", "--model", str(tmp_path / "missing"), "--tasks", "demo_mc"])
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: model path '{tmp_path / 'missing'}' does not exist"


def test_lightweight_engine_refuses_a_split_strategy(capsys, monkeypatch, tiny_model):
    code, _, err = run_main(["run", "--model", str(tiny_model), "--engine", "lightweight", "--strategy", "tp"], capsys, monkeypatch)
    assert code == 2 and "lightweight engine runs on one device" in err
