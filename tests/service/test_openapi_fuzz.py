"""Schemathesis over the whole OpenAPI document: no 5xx, and every response matches the schema.

The store holds one finished job (with results and samples) and the app runs its monitor,
so the list, pool and metrics responses carry real content, not only empty pages.
"""

from __future__ import annotations

import time

import pytest
import schemathesis
from conftest import TOKEN
from hypothesis import HealthCheck, given, settings
from runs import write_run
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from evalfleet.orchestrator import JobState, JobStore
from evalfleet.service.app import ServiceConfig, create_app
from evalfleet.service.security import ModelRoots

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture
def api_schema(tmp_path):
    db = tmp_path / "jobs.db"
    with JobStore(db) as store:
        job = store.add({"model": {"path": "demo"}, "tasks": {"names": ["t"]}}, priority="normal", max_attempts=3)
        store.transition(job, JobState.PLACED, placement=[(0, 0)])
        now = time.time()
        store.transition(job, JobState.RUNNING, started_at=now)
        store.transition(job, JobState.SUCCEEDED, result_path=str(write_run(tmp_path / "run", "t", [1, 0, 1])))
    app = create_app(ServiceConfig(db_path=db, token=TOKEN, model_roots=ModelRoots([]), monitor_interval_s=0.2))
    return schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Authorization": f"Bearer {TOKEN}"})


OPERATIONS = [("POST", "/api/v1/jobs"), ("GET", "/api/v1/jobs"), ("GET", "/api/v1/jobs/{job_id}"),
              ("POST", "/api/v1/jobs/{job_id}/cancel"), ("GET", "/api/v1/jobs/{job_id}/events"),
              ("GET", "/api/v1/jobs/{job_id}/results"), ("GET", "/api/v1/jobs/{job_id}/samples/{task}"),
              ("GET", "/api/v1/pool"), ("GET", "/api/v1/compare"), ("GET", "/metrics"), ("GET", "/healthz"),
              ("POST", "/api/v1/sweeps"), ("GET", "/api/v1/groups"), ("GET", "/api/v1/groups/{group_id}"),
              ("POST", "/api/v1/groups/{group_id}/cancel"), ("GET", "/api/v1/watches"),
              ("GET", "/api/v1/leaderboard")]


WITHOUT_PARAMETERS = {"/api/v1/pool", "/metrics", "/healthz", "/api/v1/groups",  # nothing to make invalid
                      "/api/v1/watches"}
CASES = [(method, path, mode) for method, path in OPERATIONS for mode in GenerationMode
         if mode is GenerationMode.POSITIVE or path not in WITHOUT_PARAMETERS]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_every_operation_answers_within_its_schema(api_schema, method, path, mode):
    operation = api_schema[path][method]

    @given(operation.as_strategy(mode))
    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def answers(case):
        case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)

    answers()


def test_the_document_covers_the_api(client):
    document = client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert {(method.upper(), path) for path, item in document["paths"].items() for method in item} == set(OPERATIONS)
    assert document["paths"]["/api/v1/jobs"]["post"]["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Problem"}
