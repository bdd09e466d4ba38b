"""Sweeps over HTTP on the live service (`evalfleet serve --slots 2`): `POST /api/v1/sweeps` submits its
cells as one group, refuses models and globs outside the model roots, and skips covered cells; the
group is read and cancelled as one. (The browser test watches a sweep's jobs run to the end.)"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slow


def test_a_sweep_over_http_runs_as_a_group_and_stays_within_the_model_roots(live_service, tiny_model, tmp_path):
    live, root = live_service, tiny_model.parent
    spec = {"name": "over-http", "models": [f"{root}/tiny-*", "demo"], "tasks": [["demo_arith"]],
            "settings": [{"num_fewshot": 0}], "limit": 2}
    groups_before = live.client.get("/api/v1/groups").json()

    outside = tmp_path / "outside"
    (outside / "model").mkdir(parents=True)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    try:
        for models, status, reason in (
            (["/etc/*"], 403, "the model pattern /etc/*, whose folder /etc is outside the allowed model roots"),
            ([f"{root}/../*"], 403, "contains '..'"),
            ([f"{root}/escape/*"], 403, "leads outside the allowed model roots"),
            (["tiny-*"], 403, "not an absolute path"),
            ([str(outside / "model")], 403, "outside the allowed model roots"),
            ([f"{root}/nothing-*"], 422, "matches no folder"),
        ):
            refused = live.client.post("/api/v1/sweeps", json={**spec, "models": models})
            detail = refused.json()["detail"]
            assert refused.status_code == status and reason in detail and "\n" not in detail, (models, detail)
    finally:
        (root / "escape").unlink()
    unknown = live.client.post("/api/v1/sweeps", json={**spec, "settings": [{"fewshot": 1}]})
    assert unknown.status_code == 422 and "settings.0.fewshot" in unknown.json()["detail"]
    assert live.client.get("/api/v1/groups").json() == groups_before  # nothing was submitted

    created = live.client.post("/api/v1/sweeps", json=spec)
    assert created.status_code == 201, created.text
    sweep = created.json()
    group = sweep["group"]
    assert [cell["model"] for cell in sweep["submitted"]] == [str(tiny_model), "demo"] and sweep["skipped"] == []

    detail = live.client.get(f"/api/v1/groups/{group}").json()
    assert detail["name"] == "over-http" and detail["summary"]["jobs"] == 2
    assert [job["id"] for job in detail["jobs"]] == [cell["job"] for cell in sweep["submitted"]]
    assert all(job["group"] == group for job in detail["jobs"])

    again = live.client.post("/api/v1/sweeps", json=spec).json()  # queued or running, they cover their cells
    assert again["group"] == group and again["submitted"] == []
    assert sorted(cell["covered_by"] for cell in again["skipped"]) == sorted(job["id"] for job in detail["jobs"])
    listed = {g["id"]: g for g in live.client.get("/api/v1/groups").json()}
    assert listed[group]["summary"]["jobs"] == 2 and listed[group]["kind"] == "sweep"

    cancel_at = time.time()
    cancelled = live.client.post(f"/api/v1/groups/{group}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    # The live scheduler may have finished a job before the cancel (a result is never thrown away);
    # every other one is cancelled, and at least one was still unfinished (else the cancel answers 409).
    states = {job["id"]: (job["state"], job["finished_at"]) for job in cancelled.json()["jobs"]}
    assert all(state == "cancelled" or (state == "succeeded" and finished < cancel_at)
               for state, finished in states.values()), states
    assert any(state == "cancelled" for state, _ in states.values()), states
    nothing_left = live.client.post(f"/api/v1/groups/{group}/cancel")
    assert nothing_left.status_code == 409 and "no unfinished job" in nothing_left.json()["detail"]
    assert live.client.get("/api/v1/groups/nosuchgroup").status_code == 404
