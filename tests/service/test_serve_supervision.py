"""`evalfleet serve` keeps its scheduler alive: a real SIGKILL of the scheduler child, a restart,
`/healthz` saying so meanwhile, and the dead scheduler's running job adopted (never run twice)."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import httpx
import psutil
import pytest
from clitools import evalfleet_command
from conftest import TOKEN
from orchestrator.fleet import gone, wait_for

from evalfleet.orchestrator import JobState, JobStore
from evalfleet.orchestrator.pool import recorded_pool

pytestmark = pytest.mark.slow


def _workers(db) -> dict[int, str]:
    """The job of every live `evalfleet worker` on `db` (a dead scheduler's orphans too), by pid. A
    worker's child between its fork and its exec (a subprocess the worker starts) still shows the
    worker's command line; it is the same worker, not a second one."""
    found: dict[int, tuple[int, str]] = {}
    for process in psutil.process_iter(["cmdline", "ppid"]):
        cmdline = process.info["cmdline"] or []
        if "worker" in cmdline and str(db) in cmdline and not gone(process.pid):
            found[process.pid] = (process.info["ppid"], cmdline[cmdline.index("--job") + 1])
    return {pid: job for pid, (parent, job) in found.items() if parent not in found}


def test_a_killed_scheduler_is_restarted_and_adopts_the_running_job(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    db, log = tmp_path / "jobs.db", tmp_path / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "EVALFLEET_CACHE": str(tmp_path / "cache.sqlite")}
    env.pop("EVALFLEET_TOKEN", None)
    command = [*evalfleet_command(), "serve", "--port", "0", "--db", str(db), "--slots", "1", "--interval", "0.2",
               "--token-file", str(token_file)]
    with open(log, "ab") as handle:
        serve = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    seen_workers: dict[int, str] = {}
    try:
        found = wait_for(lambda: re.search(r"on (http://127\.0\.0\.1:\d+)/", log.read_text()) or serve.poll() is not None,
                         120, "the service to start")
        assert serve.poll() is None, log.read_text()
        with httpx.Client(base_url=found.group(1), headers={"Authorization": f"Bearer {TOKEN}"}, timeout=180) as client:
            health = client.get("/healthz")
            assert (health.status_code, health.json()) == (200, {"status": "ok", "scheduler": "running"})

            def submit() -> str:
                response = client.post("/api/v1/jobs", json={"model": "demo", "tasks": ["demo_mc"], "limit": 4})
                assert response.status_code == 201, response.text
                return response.json()["id"]

            def state(job: str) -> str:
                return client.get(f"/api/v1/jobs/{job}").json()["state"]

            first = submit()
            wait_for(lambda: state(first) == "running", 120, "the first job to run", interval=0.05)
            with JobStore(db) as store:
                killed = recorded_pool(store)["pid"]
            seen_workers.update(_workers(db))
            os.kill(killed, signal.SIGKILL)

            down = wait_for(lambda: (r := client.get("/healthz")).status_code == 503 and r, 30,
                            "/healthz to say the scheduler is down", interval=0.02)
            assert down.json() == {"status": "degraded", "scheduler": "restarting"}
            second = submit()  # accepted while the scheduler is down; it runs once one is back
            up = wait_for(lambda: (r := client.get("/healthz")).status_code == 200 and r, 120,
                          "/healthz to say the scheduler runs again", interval=0.1)
            assert up.json() == {"status": "ok", "scheduler": "running"}
            with JobStore(db) as store:
                assert recorded_pool(store)["pid"] != killed

            for job in (first, second):
                wait_for(lambda job=job: (seen_workers.update(_workers(db))
                                          or state(job) == "succeeded"), 180, f"job {job} to succeed", interval=0.2)
        with JobStore(db) as store:
            history = {job: store.events(job) for job in (first, second)}
        placed = {job: [e for e in events if e.to_state is JobState.PLACED] for job, events in history.items()}
        assert len(placed[first]) == 1, history[first]  # adopted, not run a second time
        assert len(placed[second]) == 1
        first_done = next(e.at for e in history[first] if e.to_state is JobState.SUCCEEDED)
        assert placed[second][0].at >= first_done  # the one slot stayed the adopted job's until it ended
        assert sorted(seen_workers.values()).count(first) == 1, seen_workers  # one worker for the first job
        assert "exited with code -9; restarting it in 1 s" in log.read_text()

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(90) == 0, log.read_text()
        assert not [pid for pid in seen_workers if not gone(pid)]
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        for pid in seen_workers:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
