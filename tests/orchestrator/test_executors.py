"""SubprocessExecutor against real child processes."""

from __future__ import annotations

import json
import sys
import time

import pytest

from evalfleet.orchestrator.executors import RUNNING, Exited, SubprocessExecutor
from evalfleet.orchestrator.states import JobState
from evalfleet.orchestrator.store import JobStore
from evalfleet.types import EvalfleetError

PY = sys.executable


def _job(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    job_id = store.add({"model": {"path": "demo"}}, priority="normal", max_attempts=2)
    return store, store.get(job_id)


def _wait_exit(executor, handle, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = executor.poll(handle)
        if isinstance(status, Exited):
            return status
        time.sleep(0.05)
    raise AssertionError("the child did not exit")


def test_child_sees_its_job_and_devices_and_exit_code(tmp_path):
    store, job = _job(tmp_path)
    script = (
        "import os, json, sys;"
        "print(json.dumps({k: os.environ.get(k) for k in "
        "('EVALFLEET_JOB_ID', 'EVALFLEET_PLACEMENT', 'CUDA_VISIBLE_DEVICES', 'EXTRA')}), flush=True);"
        "sys.exit(3)"
    )
    executor = SubprocessExecutor([PY, "-c", script, "{job_id}"], log_dir=tmp_path / "logs", env={"EXTRA": "x"})
    handle = executor.launch(job, [(0, 2), (0, 5)])
    assert handle.job_id == job.id and handle.pid == handle.data["pid"]
    assert _wait_exit(executor, handle) == Exited(3)
    seen = json.loads((tmp_path / "logs" / f"{job.id}.attempt0.log").read_text())
    assert seen == {"EVALFLEET_JOB_ID": job.id, "EVALFLEET_PLACEMENT": "[[0, 2], [0, 5]]",
                    "CUDA_VISIBLE_DEVICES": "2,5", "EXTRA": "x"}
    store.close()


def test_command_factory_and_cancel(tmp_path):
    store, job = _job(tmp_path)
    executor = SubprocessExecutor(lambda j, p: [PY, "-c", "import time; time.sleep(60)"], grace_s=5)
    handle = executor.launch(job, [(0, 0)])
    assert executor.poll(handle) == RUNNING
    executor.preempt(handle)
    status = _wait_exit(executor, handle)
    assert status.code is not None and status.code != 0
    store.close()


def test_sigkill_after_grace_when_sigterm_is_ignored(tmp_path):
    store, job = _job(tmp_path)
    script = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
              "print('ready', flush=True); time.sleep(60)")
    log_dir = tmp_path / "logs"
    executor = SubprocessExecutor([PY, "-c", script], grace_s=0.2, log_dir=log_dir)
    handle = executor.launch(job, [(0, 0)])
    log = log_dir / f"{job.id}.attempt0.log"
    deadline = time.monotonic() + 20
    while "ready" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    executor.cancel(handle)
    assert _wait_exit(executor, handle).code == -9
    store.close()


def test_reattach_finds_live_processes_and_not_dead_ones(tmp_path):
    store, job = _job(tmp_path)
    launcher = SubprocessExecutor([PY, "-c", "import time; time.sleep(60)"], set_visible_devices=False)
    handle = launcher.launch(job, [(0, 0)])
    store.transition(job.id, JobState.PLACED)
    record = store.transition(job.id, JobState.RUNNING, pid=handle.pid, handle=handle.data)

    restarted = SubprocessExecutor([PY])
    adopted = restarted.reattach(record)
    assert adopted is not None and restarted.poll(adopted) == RUNNING
    restarted.cancel(adopted)
    assert _wait_exit(launcher, handle).code is not None
    assert restarted.poll(adopted) == Exited(None)
    assert restarted.reattach(record) is None
    assert restarted.reattach(store.get(job.id).__class__(**{**record.__dict__, "handle": None})) is None
    store.close()


def test_reattach_refuses_a_reused_pid(tmp_path):
    store, job = _job(tmp_path)
    import os

    store.transition(job.id, JobState.PLACED)
    record = store.transition(job.id, JobState.RUNNING, handle={"pid": os.getpid(), "create_time": 1.0})
    assert SubprocessExecutor([PY]).reattach(record) is None
    store.close()


def test_a_missing_program_is_one_clear_error(tmp_path):
    store, job = _job(tmp_path)
    executor = SubprocessExecutor([str(tmp_path / "no-such-program")])
    with pytest.raises(EvalfleetError, match=f"cannot start job {job.id}"):
        executor.launch(job, [(0, 0)])
    store.close()
