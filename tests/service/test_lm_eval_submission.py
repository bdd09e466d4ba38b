"""lm-eval's flags over HTTP: the API body and the dashboard form take them as `evalfleet submit`
does, keep them in the job store, refuse bad values in one sentence, and refuse what would run
code on the server; the compare page names the settings two runs differ in."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from conftest import TOKEN

from evalfleet.orchestrator import JobStore
from evalfleet.service.compare import Comparison, SettingDifference
from evalfleet.types import EvaluationRequest

API = {"Authorization": f"Bearer {TOKEN}"}
PAGE = {**API, "Accept": "text/html"}


def _stored(db: Path) -> list[EvaluationRequest]:
    with JobStore(db) as store:
        return [EvaluationRequest.model_validate(record.request) for record in store.list()]


def test_the_api_body_takes_lm_eval_flags(client, app_config):
    body = {"model": "demo", "tasks": ["demo_arith"], "gen_kwargs": "do_sample=true,temperature=0.7", "seed": "3",
            "samples": {"demo_arith": [4, 2]}, "system_instruction": "Be brief.", "predict_only": True,
            "model_args": {"max_length": 256}, "metadata": {"k": 1}}
    response = client.post("/api/v1/jobs", json=body, headers=API)
    assert response.status_code in (200, 201), response.text
    (request,) = _stored(app_config.db_path)
    assert request.harness.gen_kwargs == {"do_sample": True, "temperature": 0.7} and request.seed == (3, 3, 3, 3)
    assert request.harness.samples == {"demo_arith": [2, 4]} and request.harness.predict_only
    assert request.model.max_length == 256 and request.harness.metadata == {"max_length": 256, "k": 1}


def test_the_api_refuses_bad_flags_and_code_on_the_server(client, app_config):
    refusals = [
        ({"gen_kwargs": "temperature"}, "--gen-kwargs: expected `key=value`"),
        ({"gen_kwargs": {"num_beams": 4}}, "'num_beams' is not a generation setting evalfleet applies"),
        ({"model_args": "trust_remote_code=True"}, "trust_remote_code cannot be set over HTTP"),
        ({"confirm_run_unsafe_code": True}, "cannot be confirmed over HTTP"),
        ({"samples": {"demo_mc": [0]}, "limit": 3}, "either document ids (samples) or a limit"),
        ({"apply_chat_template": True}, "has no chat template"),  # the demo model has none: seen when counted
    ]
    for fields, message in refusals:
        response = client.post("/api/v1/jobs", json={"model": "demo", "tasks": ["demo_mc"], **fields}, headers=API)
        assert 400 <= response.status_code < 500 and message in response.json()["detail"], (fields, response.text)
    assert _stored(app_config.db_path) == []


def test_the_form_takes_lm_eval_settings_and_keeps_them_on_an_error(client, app_config):
    form = {"model": "demo", "tasks": "demo_arith", "num_fewshot": "2", "seed": "0,1234,7,1234",
            "gen_kwargs": "max_gen_toks=4", "samples": '{"demo_arith": [1]}', "fewshot_as_multiturn": ""}
    bad = client.post("/jobs", data={**form, "gen_kwargs": "max_gen_toks"}, headers=PAGE, follow_redirects=False)
    assert bad.status_code == 422 and "--gen-kwargs: expected" in bad.text and 'value="0,1234,7,1234"' in bad.text
    done = client.post("/jobs", data=form, headers=PAGE, follow_redirects=False)
    assert done.status_code == 303, done.text
    (request,) = _stored(app_config.db_path)
    assert request.seed == (0, 1234, 7, 1234) and request.tasks.num_fewshot == 2
    assert request.harness.gen_kwargs == {"max_gen_toks": 4} and request.harness.samples == {"demo_arith": [1]}


def test_the_compare_page_names_differing_settings():
    from evalfleet.service.dashboard import templates

    comparison = Comparison("a1", "b2", [], [SettingDifference("chat_template_sha", None, "5564e5b0")])
    request = SimpleNamespace(url=SimpleNamespace(path="/compare"))
    page = templates.get_template("compare.html").render(request=request, jobs=[], a="a1", b="b2",
                                                          comparison=comparison, error=None)
    assert "differ in settings that can change scores" in page and "<code>chat_template_sha</code>: A null" in page
