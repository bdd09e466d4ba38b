"""Run each job as a local process (its own session, so a stop reaches all its children)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from evalfleet.orchestrator.executors.base import RUNNING, Executor, Exited, Handle, Status
from evalfleet.orchestrator.executors.standby import Standby, runs_in_standby
from evalfleet.orchestrator.store import Device, JobRecord
from evalfleet.types import STARTED_AT_VARIABLE, EvalfleetError

CommandFactory = Callable[[JobRecord, Sequence[Device]], Sequence[str]]


class SubprocessExecutor(Executor):
    """Launches `command` per job; `{job_id}` in its arguments is replaced by the job's id.

    The child learns its job from `EVALFLEET_JOB_ID` and its devices from
    `EVALFLEET_PLACEMENT` (JSON list of [node, gpu]) and, with `set_visible_devices`,
    `CUDA_VISIBLE_DEVICES`. A stop sends SIGTERM to the child's process group and
    SIGKILL once `grace_s` has passed without it exiting.

    With `standby`, one process that has already done a worker's imports is kept warm
    (`standby.Standby`, from `standby_env()`), and a launch hands the job to it when it is ready,
    else starts a process as usual; either way a fresh standby is then started for the next one,
    as it is when a restarted scheduler adopts a running job.
    """

    name = "subprocess"

    def __init__(
        self,
        command: Sequence[str] | CommandFactory,
        *,
        log_dir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        set_visible_devices: bool = True,
        grace_s: float = 10.0,
        standby: bool = False,
    ) -> None:
        self._command = command
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._env = dict(env or {})
        self._set_visible_devices = set_visible_devices
        self._grace_s = grace_s
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._kill_after: dict[int, float] = {}
        self._use_standby = standby and self._log_dir is not None
        self._standby: Standby | None = None

    def _argv(self, job: JobRecord, placement: Sequence[Device]) -> list[str]:
        if callable(self._command):
            return [str(arg) for arg in self._command(job, placement)]
        return [arg.replace("{job_id}", job.id) for arg in self._command]

    def job_env(self, job: JobRecord, placement: Sequence[Device]) -> dict[str, str]:
        """Variables for one job's process, on top of the environment and `env`."""
        env = {"EVALFLEET_JOB_ID": job.id, "EVALFLEET_PLACEMENT": json.dumps([list(d) for d in placement]),
               STARTED_AT_VARIABLE: repr(time.time())}
        if self._set_visible_devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for _, gpu in placement)
        return env

    def launch(self, job: JobRecord, placement: Sequence[Device]) -> Handle:
        env = {**os.environ, **self._env, **self.job_env(job, placement)}
        log_path = None
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self._log_dir / f"{job.id}.attempt{job.attempts}.log"
        argv = self._argv(job, placement)
        child = self._hand_to_standby(argv, env, log_path)
        standby = child is not None
        try:
            if child is None:
                with open(log_path or os.devnull, "ab") as log:
                    child = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                        env=env, start_new_session=True,
                    )
        except OSError as error:
            raise EvalfleetError(f"cannot start job {job.id} ({argv[0]}): {error.strerror or error}") from None
        finally:
            self._warm_standby()
        self._children[child.pid] = child
        return Handle(job.id, child.pid, {"pid": child.pid, "create_time": _create_time(child.pid),
                                          "log": str(log_path) if log_path else None, "standby": standby})

    def standby_env(self) -> dict[str, str]:
        """The environment a standby starts in: what every job of this executor shares."""
        return {**os.environ, **self._env}

    def _hand_to_standby(self, argv: list[str], env: dict[str, str],
                         log_path: Path | None) -> subprocess.Popen[bytes] | None:
        standby = self._standby
        if standby is not None and standby.process.poll() is not None:  # it ended before it had a job
            self._standby = None
            standby.close()
            if not standby.was_ready:  # its imports fail, or touch CUDA: every standby's would
                self._use_standby = False
            return None
        if standby is None or not (runs_in_standby(argv) and standby.ready()):
            return None  # none, or still importing: the next launch may have it
        self._standby = None
        try:
            return standby.take(argv, env, log_path)
        except OSError:  # it died while waiting
            standby.close()
            return None

    def _warm_standby(self) -> None:
        """Have a standby on the way for the next launch (one at most)."""
        if not self._use_standby or self._standby is not None:
            return
        assert self._log_dir is not None
        try:
            self._standby = Standby(self.standby_env(), self._log_dir / "standby.log")
        except OSError:  # no process slot, no log folder: launches start their own process
            self._standby = None

    def close(self) -> None:
        """Stop the standby (the jobs' processes are the scheduler's to stop)."""
        standby, self._standby = self._standby, None
        if standby is not None:
            standby.close()

    def poll(self, handle: Handle) -> Status:
        pid = handle.data["pid"]
        child = self._children.get(pid)
        if child is not None:
            code = child.poll()
            if code is None:
                self._escalate(pid)
                return RUNNING
            self._forget(pid)
            return Exited(code)
        if _same_process_alive(pid, handle.data.get("create_time")):
            self._escalate(pid)
            return RUNNING
        self._forget(pid)
        return Exited(None)

    def cancel(self, handle: Handle) -> None:
        pid = handle.data["pid"]
        if _signal_group(pid, signal.SIGTERM):
            self._kill_after.setdefault(pid, time.monotonic() + self._grace_s)

    def reattach(self, job: JobRecord) -> Handle | None:
        if not job.handle or "pid" not in job.handle:
            return None
        if not _same_process_alive(job.handle["pid"], job.handle.get("create_time")):
            return None
        self._warm_standby()  # a job adopted from an earlier scheduler may need a retry as soon as any
        return Handle(job.id, job.handle["pid"], dict(job.handle))

    def _escalate(self, pid: int) -> None:
        deadline = self._kill_after.get(pid)
        if deadline is not None and time.monotonic() >= deadline:
            _signal_group(pid, signal.SIGKILL)

    def _forget(self, pid: int) -> None:
        self._children.pop(pid, None)
        self._kill_after.pop(pid, None)


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _same_process_alive(pid: int, create_time: float | None) -> bool:
    """True if `pid` runs and is the process we launched (pids get reused)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(process.create_time() - create_time) < 1.0
    except psutil.Error:
        return False


def _signal_group(pid: int, sig: signal.Signals) -> bool:
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
