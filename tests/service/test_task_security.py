"""Tasks from HTTP clients are data, not code: task roots, uploaded task YAMLs, sizing off the server.

Each test is one way a client could make the server run code or read a file outside its
roots; the server here is the app in this test process (FastAPI's TestClient), so "the server
imported it" is "this process imported it".
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest
from conftest import TOKEN

from evalfleet.orchestrator.store import JobStore
from evalfleet.service.app import ServiceConfig, create_app
from evalfleet.service.security import ModelRoots
from evalfleet.service.task_policy import TaskRefused, check_task_yaml

AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROWS = [{"question": f"{n} plus one is", "choices": [str(n + 1), str(n + 2)], "answer": 0} for n in range(5)]


def _task(name: str, data_file, **extra: str) -> str:
    """A multiple-choice task over a local JSONL file."""
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", f"  data_files: {{test: {data_file}}}",
             "test_split: test", "output_type: multiple_choice", "doc_to_text: '{{question}}'",
             "doc_to_target: '{{answer}}'", "doc_to_choice: '{{choices}}'", "metric_list:", "  - metric: acc"]
    lines += [f"{key}: {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def roots(tmp_path):
    """Model, task and data roots of the server, and a folder outside all of them."""
    folders = {name: tmp_path / name for name in ("models", "tasks", "data", "outside")}
    for folder in folders.values():
        folder.mkdir()
    for folder in (folders["data"], folders["outside"]):
        (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return folders


@pytest.fixture
def service(roots, tmp_path):
    from fastapi.testclient import TestClient

    config = ServiceConfig(db_path=tmp_path / "jobs.db", token=TOKEN, model_roots=ModelRoots([str(roots["models"])]),
                           task_roots=[str(roots["tasks"])], data_roots=[str(roots["data"])], monitor_interval_s=None)
    with TestClient(create_app(config), base_url="http://127.0.0.1") as client:
        yield client


def _record(tmp_path, job_id):
    with JobStore(tmp_path / "jobs.db") as store:
        return store.get(job_id)


def _submit(client, **body):
    return client.post("/api/v1/jobs", json={"model": "demo", "limit": 3, **body}, headers=AUTH)


def test_a_task_folder_under_the_model_roots_but_no_task_root_is_refused(service, roots):
    folder = roots["models"] / "tasks"
    folder.mkdir()
    (folder / "mine.yaml").write_text(_task("mine", roots["data"] / "rows.jsonl"))
    response = _submit(service, tasks=["mine"], include_path=str(folder))
    assert response.status_code == 403
    assert response.json()["detail"].startswith(f"the task folder {folder} is outside the allowed task roots")


def test_an_uploaded_function_tag_is_refused_and_its_module_never_imported(service, roots, monkeypatch):
    marker = roots["outside"] / "imported"
    (roots["outside"] / "planted.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef text(doc): return ''\n")
    monkeypatch.syspath_prepend(str(roots["outside"]))  # importable, as lm-eval's loader would find it
    monkeypatch.setenv("PYTHONPATH", str(roots["outside"]))
    yaml = _task("planted", roots["data"] / "rows.jsonl").replace("'{{question}}'", "!function planted.text")
    response = _submit(service, tasks=["planted"], task_yaml=yaml)
    assert response.status_code == 422
    assert response.json()["detail"].startswith("the task YAML uses the tag !function")
    assert not marker.exists()


def test_the_dashboard_form_takes_an_uploaded_task_through_the_same_checks(service):
    form = {"model": "demo", "tasks": "planted", "task_yaml": "task: planted\ndoc_to_text: !function planted.text\n"}
    page = service.post("/jobs", data=form, headers=AUTH)
    assert page.status_code == 422 and "the task YAML uses the tag !function" in page.text


def test_an_uploaded_include_outside_the_task_roots_is_refused(service, roots):
    elsewhere = roots["outside"] / "base.yaml"
    elsewhere.write_text(_task("base", roots["outside"] / "rows.jsonl"))
    response = _submit(service, tasks=["mine"], task_yaml=f"task: mine\ninclude: {elsewhere}\n")
    assert response.status_code == 403
    assert response.json()["detail"].startswith(f"the included task file {elsewhere} is outside the allowed task roots")


@pytest.mark.parametrize("data_files", ["{outside}", "[{data}, {outside}]", "{{test: [{outside}]}}",
                                        "{data_root}/../outside/rows.jsonl"])
def test_uploaded_data_files_outside_the_roots_are_refused(service, roots, data_files):
    named = data_files.format(outside=roots["outside"] / "rows.jsonl", data=roots["data"] / "rows.jsonl",
                              data_root=roots["data"])
    yaml = _task("mine", "x").replace("{test: x}", named)
    response = _submit(service, tasks=["mine"], task_yaml=yaml)
    assert response.status_code == 403
    assert "is outside the allowed data roots" in response.json()["detail"]


def test_an_accepted_upload_is_kept_by_the_server_and_counted(service, roots, tmp_path):
    yaml = _task("uploaded_mc", roots["data"] / "rows.jsonl")
    response = _submit(service, tasks=["uploaded_mc"], task_yaml=yaml)
    assert response.status_code == 201, response.text
    record = _record(tmp_path, response.json()["id"])
    assert record.size["source"] == "counted", record.size
    assert record.size["requests_by_type"] == {"loglikelihood": 6}  # 3 documents x 2 choices
    tasks = record.request["tasks"]
    assert tasks["untrusted"] is True
    assert tasks["include_path"].startswith(str(tmp_path / "uploaded-tasks"))


def test_a_template_that_reaches_python_is_refused_at_submit(service, roots):
    marker = roots["outside"] / "ran"
    escape = f"\"{{{{ lipsum.__globals__['os'].system('touch {marker}') }}}}\""
    yaml = _task("escape", roots["data"] / "rows.jsonl").replace("'{{question}}'", escape)
    response = _submit(service, tasks=["escape"], task_yaml=yaml)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("a task template reaches beyond its document")
    assert not marker.exists()


def test_sizing_runs_in_a_worker_process_not_the_servers(service, roots, tmp_path):
    """A trusted task-root task may run code (the operator wrote it), but never inside the web server."""
    folder = roots["tasks"] / "operator"
    folder.mkdir()
    pids = roots["outside"] / "pids"
    (folder / "recorder.py").write_text(textwrap.dedent(f"""
        import os

        def docs(dataset):
            with open({str(pids)!r}, "a") as handle:
                handle.write(f"{{os.getpid()}}\\n")
            return dataset
    """))
    (folder / "recorded.yaml").write_text(_task("recorded", roots["data"] / "rows.jsonl",
                                                process_docs="!function recorder.docs"))
    response = _submit(service, tasks=["recorded"], include_path=str(folder))
    assert response.status_code == 201, response.text
    assert _record(tmp_path, response.json()["id"]).size["source"] == "counted"
    recorded = {int(pid) for pid in pids.read_text().split()}
    assert recorded and os.getpid() not in recorded


@pytest.mark.parametrize(("yaml", "refusal"), [
    ("task: t\ncustom_dataset: x\n", "'custom_dataset' is not taken"),
    ("task: t\nfewshot_config: {process_docs: x}\n", "'process_docs' is not taken"),
    ("task: t\nprocess_results: x\n", "'process_results' is not taken"),
    ("task: t\nuse_prompt: /etc/prompts.yaml:p\n", "'use_prompt' is not taken"),
    ("task: t\nx: !!python/name:os.system\n", "uses the tag"),
    ("task: t\nmetric_list: [{metric: /srv/evil.py}]\n", "not one of lm-eval's registered metrics"),
    ("task: t\nmetric_list: [{metric: acc, hf_evaluate: true}]\n", "'hf_evaluate' is not taken"),
    ("task: t\ninclude: base.yaml\n", "is not an absolute path"),
    ("task: t\ndataset_path: ../data\n", "neither a hub dataset id"),
    ("task: t\ndataset_path: https://example.com/x\n", "neither a hub dataset id"),
    ("task: t\ndataset_kwargs: {cache_dir: /tmp}\n", "dataset_kwargs.cache_dir is not taken"),
    ("task: t\ndataset_kwargs: {data_files: rows.jsonl}\n", "is not an absolute path"),
    ("task: t\na: &x [1]\nb: *x\n", "uses an alias"),
    ("group: g\ntask: [t]\n", "defines one task, not a group"),
    ("task: ../t\n", "names its one task"),
])
def test_code_and_file_bearing_task_settings_are_refused(roots, yaml, refusal):
    with pytest.raises(TaskRefused, match=refusal.replace("(", r"\(")):
        check_task_yaml(yaml, [roots["tasks"]], [roots["tasks"], roots["data"]])


def test_a_dataset_path_under_the_data_roots_and_a_hub_id_are_accepted(roots):
    accepted = check_task_yaml(f"task: t\ndataset_path: {roots['data']}\n", [], [roots["data"]])
    assert accepted["dataset_path"] == str(roots["data"])
    assert check_task_yaml("task: t\ndataset_path: org/name\n", [], [])["dataset_path"] == "org/name"
