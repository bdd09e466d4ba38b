"""Service fixtures: an in-process app over a fresh store, and one real `evalfleet serve --slots 2`.

The real server (with its scheduler and workers) is shared by the API and browser tests of
this folder: starting workers is what costs, so the tests submit into one fleet. It binds
127.0.0.1 on a free port and is stopped, workers and all, when the session ends.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from clitools import evalfleet_command
from orchestrator.fleet import gone, wait_for

from evalfleet.service.app import ServiceConfig, create_app
from evalfleet.service.security import ModelRoots

TOKEN = "test-token-0123456789abcdef"


@pytest.fixture
def app_config(tmp_path) -> ServiceConfig:
    return ServiceConfig(db_path=tmp_path / "jobs.db", token=TOKEN, model_roots=ModelRoots([]),
                         monitor_interval_s=None)


@pytest.fixture
def client(app_config):
    from fastapi.testclient import TestClient

    with TestClient(create_app(app_config), base_url="http://127.0.0.1") as client:
        yield client


@dataclass
class LiveService:
    url: str
    db: Path
    log: Path
    process: subprocess.Popen
    client: httpx.Client

    def wait_state(self, job_id: str, *states: str, timeout: float = 180) -> dict:
        def reached():
            job = self.client.get(f"/api/v1/jobs/{job_id}").json()
            return job if job["state"] in states else None

        return wait_for(reached, timeout, f"job {job_id} to reach {states}", interval=0.3)


@pytest.fixture(scope="session")
def live_service(tmp_path_factory, tiny_model) -> LiveService:
    """`evalfleet serve --slots 2` as a real process, with `tiny_model`'s folder as a model root."""
    home = tmp_path_factory.mktemp("service")
    token_file = home / "token"
    token_file.write_text(TOKEN + "\n")
    log = home / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "EVALFLEET_CACHE": str(home / "cache.sqlite")}
    env.pop("EVALFLEET_TOKEN", None)
    command = [*evalfleet_command(), "serve", "--port", "0", "--db", str(home / "jobs.db"), "--slots", "2",
               "--interval", "0.2", "--token-file", str(token_file), "--model-root", str(tiny_model.parent)]
    with open(log, "ab") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    try:
        found = wait_for(lambda: re.search(r"on (http://127\.0\.0\.1:\d+)/", log.read_text())
                         or process.poll() is not None, 120, "the service to start")
        assert process.poll() is None, log.read_text()
        url = found.group(1)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=180) as client:
            yield LiveService(url, home / "jobs.db", log, process, client)
        process.send_signal(signal.SIGTERM)  # what a service manager sends; it stops the scheduler too
        assert process.wait(90) == 0, log.read_text()
        assert "scheduler stopped" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        wait_for(lambda: gone(process.pid), 10, "the service to exit")


@pytest.fixture(scope="session")
def leaderboard_jobs(live_service, tiny_model, tmp_path_factory):
    """Finished jobs in the live service's store for the leaderboard tests (see leaderboard_runs.py)."""
    from leaderboard_runs import submit_leaderboard_jobs

    return submit_leaderboard_jobs(live_service, tiny_model, tmp_path_factory.mktemp("checkpoints"))
