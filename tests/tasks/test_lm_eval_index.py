"""lm-eval's built-in task index, kept on disk: the manager read from it equals lm-eval's own."""

from __future__ import annotations

import json
import logging

import pytest

from evalfleet.tasks import DEMO_TASKS_DIR, lm_eval_index

OVERRIDE = """task: arc_easy
dataset_path: json
dataset_kwargs:
  data_files:
    test: mine.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: q
doc_to_choice: [a, b]
doc_to_target: 0
"""


@pytest.fixture(scope="module")
def include(tmp_path_factory):
    """The demo tasks and a user's task that takes a built-in task's name (arc_easy)."""
    folder = tmp_path_factory.mktemp("include")
    (folder / "arc_easy_mine.yaml").write_text(OVERRIDE)
    return [DEMO_TASKS_DIR, folder]


@pytest.fixture(scope="module")
def lm_evals_own(include):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=True)


@pytest.fixture
def small_builtins(monkeypatch):
    """lm-eval's index builder, made to read the demo tasks instead of its 14,000 files."""
    from lm_eval.tasks._index import TaskIndex

    build = TaskIndex.build
    monkeypatch.setattr(TaskIndex, "build", staticmethod(lambda paths, **kw: build([DEMO_TASKS_DIR], **kw)))


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """A task index folder of this module's own, written once by the first manager."""
    return tmp_path_factory.mktemp("task-index")


def test_a_manager_built_from_the_kept_index_equals_lm_evals_own(lm_evals_own, include, kept, monkeypatch):
    monkeypatch.setenv("EVALFLEET_TASK_INDEX", str(kept))
    built = lm_eval_index.task_manager(include, {})  # builds the index and keeps it
    assert [path.name for path in kept.iterdir()] == [f"{lm_eval_index.install_key()}.json"]

    from lm_eval.tasks._index import TaskIndex

    def no_parsing(*args, **kwargs):
        raise AssertionError("lm-eval's task files were parsed again")

    monkeypatch.setattr(TaskIndex, "build", staticmethod(no_parsing))
    read = lm_eval_index.builtin_index()  # from the file only
    assert len(read) > 10_000
    monkeypatch.undo()
    monkeypatch.setenv("EVALFLEET_TASK_INDEX", str(kept))
    for manager in (built, lm_eval_index.task_manager(include, {})):
        assert manager.task_index == lm_evals_own.task_index
        for listing in ("all_tasks", "all_subtasks", "all_groups", "all_tags"):
            assert getattr(manager, listing) == getattr(lm_evals_own, listing), listing
    # The user's arc_easy overrides lm-eval's, as lm-eval orders its paths.
    assert built.task_index["arc_easy"].yaml_path.name == "arc_easy_mine.yaml"
    assert "ai2_arc" in built.all_tags and "mmlu" in built.all_groups


def test_a_damaged_or_foreign_index_file_is_rebuilt(small_builtins, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EVALFLEET_TASK_INDEX", str(tmp_path))
    path = tmp_path / f"{lm_eval_index.install_key()}.json"
    good = lm_eval_index.builtin_index()
    path.write_text(path.read_text()[:100])  # a write cut short
    with caplog.at_level(logging.WARNING, logger="evalfleet.tasks.lm_eval_index"):
        index = lm_eval_index.builtin_index()
    assert "unreadable" in caplog.text and index == good and "demo_mc" in index
    assert json.loads(path.read_text())["format"] == lm_eval_index.FORMAT  # written again, whole
    path.write_text(json.dumps({"format": lm_eval_index.FORMAT + 1, "entries": []}))
    assert len(lm_eval_index.builtin_index()) == len(index)


def test_a_folder_that_cannot_be_written_costs_time_not_the_run(small_builtins, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("EVALFLEET_TASK_INDEX", str(blocker / "index"))
    with caplog.at_level(logging.WARNING, logger="evalfleet.tasks.lm_eval_index"):
        assert "demo_mc" in lm_eval_index.builtin_index()
    assert "could not be kept" in caplog.text


def test_an_index_json_would_change_is_not_kept(tmp_path):
    from lm_eval.tasks._index import Entry, Kind

    entry = Entry(name="t", kind=Kind.TASK, yaml_path=None, cfg={"doc_to_choice": {0: "a"}}, tags=set())
    lm_eval_index._write(tmp_path / "i.json", {"t": entry})  # an int key would come back a string
    assert not (tmp_path / "i.json").exists()
    entry.cfg = {"doc_to_choice": {"0": "a"}}
    lm_eval_index._write(tmp_path / "i.json", {"t": entry})
    assert lm_eval_index._read(tmp_path / "i.json") == {"t": entry}
