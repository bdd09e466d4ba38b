"""A worker process started before it is needed, so a job's launch skips the imports.

Importing torch, transformers and lm-eval takes a job's worker about 10 s of CPU before it does
anything (`python -X importtime`; a job on Ray also connects to the cluster). A scheduler keeps
one `Standby` warm: a process that has done those imports (and joined the Ray cluster) and waits
on its standard input. The next launch hands it the job: the job's environment, its log file and
its `evalfleet` command line; the process takes them on and runs the worker as a freshly started
one would. A retry after a killed worker or a lost node, and every job after the first, then
starts with its model load.

The standby runs in its own session, as any worker does, so stopping a job's process group stops
it; before it is handed a job it exits when the scheduler goes (its standard input closes). A
process that has touched CUDA during its imports never says it is ready: CUDA must not be
initialized before the job's `CUDA_VISIBLE_DEVICES` is set. A standby that ends without having
been ready (that, or imports that fail) turns standbys off for its scheduler, whose launches then
start their own processes; one that ended after it was ready is replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

READY_FD_VARIABLE = "EVALFLEET_STANDBY_FD"
CLI_PREFIX = ("-m", "evalfleet.cli")
# What every worker imports before its first request; a Ray driver adds the Ray engine.
PRELOAD = ("evalfleet.orchestrator.worker", "evalfleet.engines.run")
PRELOAD_RAY = ("evalfleet.engines.ray_engine",)


class Standby:
    """One pre-started worker process; `ready()` once its imports are done, `take()` hands it a job."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        read, write = os.pipe()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-c", f"from {__name__} import main; main()"], stdin=subprocess.PIPE,
                    stdout=log, stderr=subprocess.STDOUT, env={**env, READY_FD_VARIABLE: str(write)},
                    pass_fds=(write,), start_new_session=True)
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
        os.set_blocking(read, False)
        self._ready_fd: int | None = read
        self._ready = False

    def ready(self) -> bool:
        """Whether the process has done its imports and waits for a job (never blocks)."""
        if not self._ready and self._ready_fd is not None:  # the byte outlives a process that died after it
            with contextlib.suppress(BlockingIOError):
                self._ready = os.read(self._ready_fd, 1) == b"r"
        return self._ready and self.process.poll() is None

    @property
    def was_ready(self) -> bool:
        """Whether the process ever said it was ready."""
        self.ready()
        return self._ready

    def take(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path | None) -> subprocess.Popen[bytes]:
        """Hand the process a job: `argv` (`python -m evalfleet.cli ...`), its whole environment and
        its log file. Raises OSError if the process is gone."""
        order = {"argv": list(argv[len(CLI_PREFIX) + 1:]), "env": dict(env), "log": str(log_path or os.devnull)}
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(order).encode() + b"\n")
        self.process.stdin.close()
        self._close_fd()
        return self.process

    def close(self) -> None:
        """Stop the process if no job was handed to it."""
        self._close_fd()
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.stdin.close()
            self.process.wait()

    def _close_fd(self) -> None:
        if self._ready_fd is not None:
            os.close(self._ready_fd)
            self._ready_fd = None


def runs_in_standby(argv: Sequence[str]) -> bool:
    """Whether a standby can run this command: the evalfleet CLI under this Python."""
    return len(argv) > len(CLI_PREFIX) and argv[0] == sys.executable and tuple(argv[1:3]) == CLI_PREFIX


def _wait_for_job() -> dict | None:
    """Import what a worker needs, say so, and read the job; None if the scheduler went first."""
    import importlib

    from evalfleet.orchestrator.executors.ray import ADDRESS_VARIABLE

    address = os.environ.get(ADDRESS_VARIABLE)
    for module in PRELOAD + (PRELOAD_RAY if address else ()):
        importlib.import_module(module)
    import torch

    if torch.cuda.is_initialized():  # a job's CUDA_VISIBLE_DEVICES would come too late
        print("[evalfleet standby] CUDA was initialized by the imports; not used", flush=True)
        return None
    if address:
        from evalfleet.runtime.ray_ranks import connect

        connect(address)
    ready = int(os.environ.pop(READY_FD_VARIABLE))
    print(f"[evalfleet standby] process {os.getpid()} ready", flush=True)
    os.write(ready, b"r")
    os.close(ready)
    line = sys.stdin.readline()
    return json.loads(line) if line.strip() else None


def main() -> None:
    order = _wait_for_job()
    if order is None:
        return
    from evalfleet.cli import main as cli_main

    os.environ.clear()
    os.environ.update(order["env"])
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(order["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    sys.argv = ["evalfleet", *order["argv"]]
    cli_main()

