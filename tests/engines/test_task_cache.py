"""A second run of the same tasks takes lm-eval's built requests from disk; an edited task does not."""

from __future__ import annotations

import json

import pytest
from lm_eval.api.task import ConfigurableTask

from evalfleet.engines.lightweight import LightweightEvaluationEngine
from evalfleet.types import EvaluationRequest


@pytest.fixture
def task_folder(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    rows = [{"q": f"{i} plus one is", "options": [str(i + 1), str(i + 2)], "gold": 0} for i in range(6)]
    (folder / "plus.jsonl").write_text("\n".join(map(json.dumps, rows)))
    (folder / "plus.yaml").write_text(
        f"task: plus_one\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'plus.jsonl'}\n"
        'output_type: multiple_choice\ntest_split: test\ndoc_to_text: "{{q}}"\ndoc_to_choice: options\ndoc_to_target: gold\n'
        "metric_list:\n  - metric: acc\n"
    )
    return folder


@pytest.fixture
def built(monkeypatch):
    """Counts the documents lm-eval turns into requests."""
    calls = []
    original = ConfigurableTask.construct_requests

    def counting(self, *args, **kwargs):
        calls.append(self.config.task)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ConfigurableTask, "construct_requests", counting)
    return calls


def _run(engine, model, folder, out):
    request = EvaluationRequest.model_validate({
        "model": {"path": str(model), "dtype": "float32", "device": "cpu"},
        "tasks": {"names": ["plus_one"], "include_path": str(folder)}, "output_dir": str(out), "use_cache": False,
    })
    result = engine.evaluate_sync(request)
    _check_split(result.evalfleet["timing"])
    return result.results["results"]["plus_one"]


def _check_split(timing: dict) -> None:
    """results.json splits the wall time: every part is there, none negative, and they add up."""
    split = timing["split"]
    assert set(split) == {"startup_seconds", "requests_seconds", "compute_seconds", "scoring_seconds", "writing_seconds"}
    assert min(split.values()) >= 0 and split["compute_seconds"] > 0 and split["writing_seconds"] > 0
    inside = split["requests_seconds"] + split["compute_seconds"] + split["scoring_seconds"]
    assert abs(inside - timing["wall_seconds"]) <= 0.01 + 0.01 * timing["wall_seconds"]


def test_built_requests_are_reused_until_the_task_changes(tiny_model, task_folder, built, tmp_path, isolated_cache):
    engine = LightweightEvaluationEngine()
    first = _run(engine, tiny_model, task_folder, tmp_path / "a")
    assert len(built) == 6
    assert list((isolated_cache.parent / "lm-eval-requests").glob("*/*.pickle"))
    second = _run(engine, tiny_model, task_folder, tmp_path / "b")
    assert len(built) == 6, "the second run built requests again"
    assert second == first
    rows = [json.loads(line) for line in (task_folder / "plus.jsonl").read_text().splitlines()]
    (task_folder / "plus.jsonl").write_text("\n".join(json.dumps({**row, "gold": 1}) for row in rows))
    third = _run(engine, tiny_model, task_folder, tmp_path / "c")
    assert len(built) == 12, "an edited data file must not be served from the cache"
    assert third["acc,none"] == pytest.approx(1 - first["acc,none"])
