"""A real `evalfleet scheduler` in the background, for the end-to-end tests.

The scheduler and its workers are real processes; the tests read the job store directly
to wait (cheaper than one CLI call per poll) and use the CLI to submit, cancel and check.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from evalfleet.orchestrator import JobRecord, JobState, JobStore
from clitools import evalfleet_command, run_subprocess


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def count_ahead(scratch: Path, *submits: tuple[str, ...]) -> None:
    """Submit each of `submits` once, in this process, to a scratch store, so their job sizes are
    counted and kept: the fleet's own submits of the same jobs then return at once (as a second
    submit of the same tasks does), and a test's timing does not hinge on the first count."""
    from typer.testing import CliRunner

    from evalfleet.cli import app

    for args in submits:
        done = CliRunner().invoke(app, ["submit", *args, "--db", str(scratch / "count-ahead.db")])
        assert done.exit_code == 0, (args, done.output)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@dataclass
class Fleet:
    db: Path
    log: Path
    process: subprocess.Popen | None = None
    seen: dict[int, float] = field(default_factory=dict)
    """Every worker process seen (pid -> create time), to check none outlives the scheduler."""

    def start(self, *args: str) -> None:
        command = [*evalfleet_command(), "scheduler", "--db", str(self.db), *args]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_for(lambda: "Ctrl-C stops it" in self.log.read_text() or self.process.poll() is not None,
                 60, "the scheduler to start")
        assert self.process.poll() is None, self.log.read_text()

    def cli(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
        done = run_subprocess([*args, "--db", str(self.db)], timeout=120)
        assert done.returncode == expect, (args, done.returncode, done.stdout, done.stderr)
        return done

    def submit(self, *args: str) -> str:
        done = self.cli("submit", *args)
        job_id = done.stdout.strip()
        assert len(job_id) == 12 and job_id.isalnum(), done.stdout
        return job_id

    def status(self, job_id: str) -> dict:
        return json.loads(self.cli("status", job_id, "--json").stdout)

    def record(self, job_id: str) -> JobRecord:
        with JobStore(self.db) as store:
            record = store.get(job_id)
        self._remember(record.pid)
        return record

    def wait_state(self, job_id: str, *states: JobState, timeout: float = 120) -> JobRecord:
        def reached() -> JobRecord | None:
            record = self.record(job_id)
            if record.state.terminal and record.state not in states:
                raise AssertionError(f"job {job_id} ended {record.state.value}: {record.error}\n{self.log.read_text()}")
            return record if record.state in states else None

        return wait_for(reached, timeout, f"job {job_id} to be {'/'.join(s.value for s in states)}")

    def events(self, job_id: str | None = None):
        with JobStore(self.db) as store:
            return store.events(job_id)

    def workers(self) -> list[psutil.Process]:
        children = psutil.Process(self.process.pid).children(recursive=True)
        for child in children:
            self._remember(child.pid)
        return children

    def standby(self) -> psutil.Process | None:
        """The scheduler's standby worker once it says it is ready (`executors.standby`)."""
        log = self.db.parent / "logs" / "standby.log"
        ready = log.read_text() if log.exists() else ""
        for child in self.workers():
            try:
                if "executors.standby" in " ".join(child.cmdline()) and f"process {child.pid} ready" in ready:
                    return child
            except psutil.Error:  # a worker that just ended
                continue
        return None

    def _remember(self, pid: int | None) -> None:
        if pid is None or pid in self.seen:
            return
        try:
            self.seen[pid] = psutil.Process(pid).create_time()
        except psutil.Error:
            pass

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM the scheduler, wait for it, and return its exit code."""
        self.workers()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self.process = None
        return code

    def kill_all(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.workers()
            self.process.kill()
            self.process.wait(30)
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def leftovers(self) -> list[int]:
        """Workers seen during the test that are still alive (pids are checked with their start time)."""
        alive = []
        for pid, created in self.seen.items():
            try:
                process = psutil.Process(pid)
                if abs(process.create_time() - created) < 1 and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                continue
        return alive


@contextlib.contextmanager
def fleet_in(tmp_path: Path, *, check_leftovers: bool = True) -> Iterator[Fleet]:
    """A fleet over a fresh store; afterwards its scheduler stopped cleanly and no process is left."""
    fleet = Fleet(tmp_path / "fleet" / "jobs.db", tmp_path / "scheduler.log")
    fleet.db.parent.mkdir()
    try:
        yield fleet
        if fleet.process is not None:
            assert fleet.stop() == 0, fleet.log.read_text()
        if check_leftovers:
            assert fleet.leftovers() == [], f"workers outlived the scheduler\n{fleet.log.read_text()}"
    finally:
        fleet.kill_all()  # whatever happened above, leave no process behind
