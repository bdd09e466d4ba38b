"""The API over a real store, a real scheduler on two CPU slots and real workers (`evalfleet serve`)."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from clitools import run_subprocess
from conftest import TOKEN
from orchestrator.fleet import wait_for

pytestmark = pytest.mark.slow


def _events(live, job_id: str) -> list[tuple[str, dict]]:
    """The job's whole event stream, read until the server ends it (when the job finishes)."""
    events, name = [], None
    with live.client.stream("GET", f"/api/v1/jobs/{job_id}/events", timeout=240) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and name:
                events.append((name, json.loads(line.split(":", 1)[1])))
    return events


def _succeeded_and_waits(live) -> tuple[float, float]:
    metrics = live.client.get("/metrics").text
    succeeded = re.search(r'^evalfleet_jobs\{state="succeeded"\} (\S+)$', metrics, re.M)
    waits = re.search(r"^evalfleet_queue_wait_seconds_count (\S+)$", metrics, re.M)
    return float(succeeded.group(1)) if succeeded else 0.0, float(waits.group(1)) if waits else 0.0


def test_submit_follow_results_samples_and_compare(live_service, tiny_model):
    live = live_service  # one service per session: other tests' jobs may be in its store, so counts are deltas
    succeeded_before, waits_before = _succeeded_and_waits(live)
    high = {"state": "succeeded", "priority": "high"}
    high_before = {j["id"] for j in live.client.get("/api/v1/jobs", params={**high, "limit": 200}).json()["jobs"]}
    tiny_before = live.client.get("/api/v1/jobs", params={"model": "tiny", "limit": 1}).json()["total"]
    demo = live.client.post("/api/v1/jobs", json={"model": "demo", "tasks": ["demo_mc", "demo_arith"], "limit": 6})
    assert demo.status_code == 201, demo.text
    demo_id = demo.json()["id"]
    tiny = live.client.post("/api/v1/jobs", json={"model": str(tiny_model), "tasks": ["demo_mc", "demo_arith"],
                                                  "limit": 6, "priority": "high"})
    assert tiny.status_code == 201, tiny.text
    refused = live.client.post("/api/v1/jobs", json={"model": "demo", "tasks": ["demo_mc"], "gpus": 64, "strategy": "tp",
                                                     "tp": 64})
    assert refused.status_code == 422 and "\n" not in refused.json()["detail"]

    events = _events(live, demo_id)
    states = [data["to"] for name, data in events if name == "state"]
    assert states[0] == "queued" and states[-3:] == ["placed", "running", "succeeded"], events
    progress = [data for name, data in events if name == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] > 0
    assert all(a["done"] <= b["done"] for a, b in zip(progress, progress[1:]))

    job = live.wait_state(tiny.json()["id"], "succeeded")
    assert job["progress"]["done"] == job["progress"]["total"] and job["attempts"] == 1
    listed = live.client.get("/api/v1/jobs", params={**high, "limit": 200}).json()
    assert [j["id"] for j in listed["jobs"] if j["id"] not in high_before] == [job["id"]]
    assert listed["total"] == len(high_before) + 1 and demo_id not in {j["id"] for j in listed["jobs"]}
    assert live.client.get("/api/v1/jobs", params={"model": "tiny", "limit": 1}).json()["total"] == tiny_before + 1

    results = live.client.get(f"/api/v1/jobs/{demo_id}/results").json()
    assert set(results["results"]) == {"demo_mc", "demo_arith"}
    assert results["n-samples"]["demo_mc"]["effective"] == 6 and results["evalfleet"]["timing"]["requests"] > 0
    page = live.client.get(f"/api/v1/jobs/{demo_id}/samples/demo_mc", params={"offset": 2, "limit": 3}).json()
    assert page["total"] == 6 and [s["doc_id"] for s in page["samples"]] == [2, 3, 4]
    assert {"acc", "resps", "arguments", "doc_hash"} <= set(page["samples"][0])
    missing = live.client.get(f"/api/v1/jobs/{demo_id}/samples/no_such_task")
    assert missing.status_code == 404 and "did not evaluate a task named 'no_such_task'" in missing.json()["detail"]

    comparison = live.client.get("/api/v1/compare", params={"a": demo_id, "b": job["id"]}).json()
    mc = next(t for t in comparison["tasks"] if t["task"] == "demo_mc")
    acc = next(m for m in mc["metrics"] if m["metric"] == "acc")
    demo_acc = results["results"]["demo_mc"]["acc,none"]
    assert acc["a"] == demo_acc and acc["difference"] == pytest.approx(demo_acc - acc["b"])
    assert acc["test"] == "mcnemar" and 0 < acc["p_value"] <= 1
    samples_a = {s["doc_id"]: s["acc"] for s in live.client.get(f"/api/v1/jobs/{demo_id}/samples/demo_mc").json()["samples"]}
    samples_b = {s["doc_id"]: s["acc"] for s in live.client.get(f"/api/v1/jobs/{job['id']}/samples/demo_mc").json()["samples"]}
    assert [f["doc_id"] for f in acc["flipped"]] == [d for d in sorted(samples_a) if samples_a[d] != samples_b[d]]

    # The command line compares the same two jobs by id, with the same figures.
    done = run_subprocess(["compare", demo_id, job["id"], "--db", str(live.db), "--json"], timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tasks"] == comparison["tasks"]

    succeeded, waits = _succeeded_and_waits(live)
    assert succeeded >= succeeded_before + 2 and waits >= waits_before + 2
    assert "evalfleet_host" in live.client.get("/metrics").text


def test_cancel_a_running_job_frees_its_slot(live_service):
    live = live_service
    job_id = live.client.post("/api/v1/jobs", json={"model": "demo", "tasks": ["demo_mc", "demo_ppl", "demo_arith"],
                                                   "batch_size": 1, "use_cache": False}).json()["id"]
    wait_for(lambda: live.client.get(f"/api/v1/jobs/{job_id}").json()["progress"]["done"] > 0, 120,
             "the job to compute")
    pool = live.client.get("/api/v1/pool").json()
    assert pool["description"] == "2 CPU slots" and pool["monitor"]["host"]["cpu_count"] >= 1
    devices = pool["nodes"][0]["devices"]
    assert [d["status"] for d in devices].count("busy") == 1 and any(d["job"] == job_id for d in devices)

    cancelled = live.client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    again = live.client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409 and again.json() == {"detail": f"job {job_id} already cancelled"}
    wait_for(lambda: all(d["status"] == "free" for d in live.client.get("/api/v1/pool").json()["nodes"][0]["devices"]),
             60, "the slot to be freed")
    no_results = live.client.get(f"/api/v1/jobs/{job_id}/results")
    assert no_results.status_code == 409 and "it is cancelled" in no_results.json()["detail"]


def test_the_live_server_refuses_without_the_token(live_service):
    with httpx.Client(base_url=live_service.url) as anonymous:
        assert anonymous.get("/api/v1/jobs").status_code == 401
        assert anonymous.get("/metrics").status_code == 401
        assert anonymous.get("/api/v1/jobs", headers={"Authorization": f"Bearer {TOKEN[:-1]}x"}).status_code == 401
        assert anonymous.get("/healthz").json() == {"status": "ok", "scheduler": "running"}
