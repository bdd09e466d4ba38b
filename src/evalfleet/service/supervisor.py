"""`serve`'s scheduler child, kept alive: started, watched, restarted, stopped.

A scheduler that exits while `serve` runs (a crash, the OOM killer, a SIGKILL) is started
again after a backoff (1 s, doubling to 30 s; back to 1 s once one has run longer than that),
and `/healthz` answers 503 meanwhile, so a probe sees what the API alone would hide: jobs
accepted that nothing starts. The new scheduler adopts the workers the dead one left
running (by pid and start time) and requeues those that are gone, as at any restart.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from evalfleet.orchestrator.pool import recorded_pool
from evalfleet.orchestrator.store import JobStore
from evalfleet.types import EvalfleetError

SCHEDULER_START_S = 120.0
SCHEDULER_STOP_S = 60.0
RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0
WATCH_S = 0.2


def _pool_recorded(store: JobStore, pid: int) -> bool:
    recorded = recorded_pool(store)
    return recorded is not None and recorded.get("pid") == pid


def start_scheduler(command: list[str], db_path: Path, cancel: threading.Event | None = None, *,
                    ready: Callable[[JobStore, int], bool] = _pool_recorded,
                    what: str = "the scheduler") -> subprocess.Popen:
    """Start the scheduler (or another child, `what`) and wait until it has recorded its pool (`ready`), has
    failed to start, or `cancel` is set."""
    process = subprocess.Popen(command)
    deadline = time.monotonic() + SCHEDULER_START_S
    with JobStore(db_path) as store:
        while time.monotonic() < deadline and not (cancel is not None and cancel.is_set()):
            if process.poll() is not None:
                raise EvalfleetError(f"{what} did not start (exit code {process.returncode}; its reason is above)")
            if ready(store, process.pid):
                return process
            time.sleep(0.1)
    stop_scheduler(process)
    if cancel is not None and cancel.is_set():
        raise EvalfleetError(f"{what}'s start was cancelled")
    raise EvalfleetError(f"{what} did not start within {SCHEDULER_START_S:.0f} s")


def stop_scheduler(process: subprocess.Popen) -> None:
    """SIGTERM (it stops and requeues its workers), then SIGKILL if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(SCHEDULER_STOP_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class SchedulerSupervisor:
    """Runs `command` (an `evalfleet scheduler`) until `stop`, restarting it whenever it exits."""

    what = "the scheduler"

    def __init__(self, command: list[str], db_path: Path, say: Callable[[str], None] = print) -> None:
        self.command, self.db_path, self.say = command, db_path, say
        self.process = self._start()  # a first start that fails is serve's failure
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="evalfleet-scheduler-supervisor", daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def state(self) -> str:
        """"running", or "restarting" from the moment the child is gone until its successor has started."""
        return "running" if self.process.poll() is None else "restarting"

    def _watch(self) -> None:
        delay, started = RESTART_FIRST_S, time.monotonic()
        while not self._stopping.wait(WATCH_S):
            code = self.process.poll()
            if code is None:
                continue
            if time.monotonic() - started > RESTART_MAX_S:
                delay = RESTART_FIRST_S  # it ran a while: a new fault, not the same one again
            self._tell(f"{self.what} (pid {self.process.pid}) exited with code {code}; restarting it in {delay:.0f} s")
            if self._stopping.wait(delay):
                return
            delay = min(2 * delay, RESTART_MAX_S)
            try:
                self.process = self._start(cancel=self._stopping)
            except EvalfleetError as error:
                if not self._stopping.is_set():
                    self._tell(f"{self.what} did not restart: {error}")
                continue
            started = time.monotonic()
            self._tell(f"{self.what} restarted (pid {self.process.pid})")

    def _start(self, cancel: threading.Event | None = None) -> subprocess.Popen:
        return start_scheduler(self.command, self.db_path, cancel)

    def _tell(self, line: str) -> None:
        self.say(line)
        sys.stdout.flush()  # from this thread, nothing else would flush it soon

    def stop(self) -> None:
        """Stop watching, then stop the scheduler (it requeues its workers' jobs)."""
        self._stopping.set()
        self._thread.join()
        stop_scheduler(self.process)
