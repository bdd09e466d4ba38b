"""The task bridge: demo tasks without lm-eval's index, lm-eval's own tasks by name, clear refusals."""

import pytest

from evalfleet.tasks import DEMO_TASKS, build_task_manager, check_task_folder
from evalfleet.types import UsageError


def test_demo_tasks_do_not_load_lm_evals_index():
    manager = build_task_manager(list(DEMO_TASKS))
    assert set(DEMO_TASKS) <= set(manager.all_tasks)
    assert "arc_easy" not in manager.all_tasks


def test_lm_evals_own_tasks_work_by_name():
    manager = build_task_manager(["demo_mc", "arc_easy"])
    assert {"demo_mc", "arc_easy"} <= set(manager.all_tasks)


def test_user_folder_tasks_are_found(tmp_path):
    (tmp_path / "mine.yaml").write_text(
        "task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: x.jsonl\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n"
    )
    assert "my_task" in build_task_manager(["my_task"], str(tmp_path)).all_tasks


def test_a_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    (tmp_path / "list.yaml").write_text("- just\n- a list\n")
    with pytest.raises(UsageError, match="list.yaml' is malformed: Expected YAML dict"):
        check_task_folder(tmp_path)
