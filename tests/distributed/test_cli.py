"""`evalfleet run --engine distributed`: the layout lands in results.json, and no worker outlives
the command, whether it succeeds or is interrupted with Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid

import psutil
import pytest
from clitools import evalfleet_command, run_subprocess
from faultenv import fault_env

pytestmark = pytest.mark.slow


def tagged_workers(tag: str) -> list[int]:
    """Worker processes started under `EVALFLEET_RUN_TAG=tag`, wherever they were reparented."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if "evalfleet.runtime.rank" in " ".join(process.info["cmdline"] or []):
                if process.environ().get("EVALFLEET_RUN_TAG") == tag and process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _args(model, out, tasks: str = "demo_mc", limit: int = 4) -> list[str]:
    return [
        "run", "--model", str(model), "--tasks", tasks, "--limit", str(limit), "--engine", "distributed",
        "--strategy", "dp", "--dp", "2", "--device", "cpu", "--dtype", "float32", "--no-cache", "--output", str(out),
    ]


def test_run_records_the_layout_and_leaves_no_worker_behind(llama, tmp_path):
    tag = uuid.uuid4().hex
    done = run_subprocess(_args(llama, tmp_path), env={"EVALFLEET_RUN_TAG": tag}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    section = json.loads((tmp_path / "results.json").read_text())["evalfleet"]
    assert section["engine"] == "distributed"
    assert (section["layout"]["strategy"], section["layout"]["dp"]) == ("dp", 2)
    assert section["layout"]["placement"] == [["cpu"], ["cpu"]]
    assert "share" in section["layout"]["communication"]
    assert tagged_workers(tag) == []


def test_ctrl_c_stops_the_run_and_its_workers(llama, tmp_path):
    tag = uuid.uuid4().hex
    command = subprocess.Popen(
        # small batches that each take a second longer, so the run is still computing when Ctrl-C comes
        [*evalfleet_command(), *_args(llama, tmp_path, "demo_mc", 20), "--max-batch-tokens", "128"],
        env={**os.environ, **fault_env("slow_batch:1"), "EVALFLEET_RUN_TAG": tag, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # as at a terminal: a test run started in the background (`cmd &` in a script) ignores SIGINT,
        # and that would pass on to the command
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while len(tagged_workers(tag)) < 2 and time.monotonic() < deadline and command.poll() is None:
            time.sleep(0.2)
        workers = tagged_workers(tag)
        assert len(workers) == 2, "the workers never started"
        command.send_signal(signal.SIGINT)
        command.wait(timeout=120)
    finally:
        if command.poll() is None:
            command.kill()
    assert command.returncode != 0, "the run ended before Ctrl-C reached it"
    assert not (tmp_path / "results.json").exists()
    deadline = time.monotonic() + 10
    while tagged_workers(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tagged_workers(tag) == []
