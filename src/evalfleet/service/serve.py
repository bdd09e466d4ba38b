"""`evalfleet serve`: the web server, and (with a pool option) the scheduler, over one job store.

The scheduler runs as its own process (`evalfleet scheduler`), started, restarted when it
exits and stopped by this one (`supervisor.py`): it keeps its signal handling, its
one-scheduler-per-store lock and its orderly worker shutdown exactly as in the foreground
command, and the web server's event loop never waits on a scheduling round. Without a pool
option the server only serves the store, and another process schedules.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from evalfleet.orchestrator.pool import pool_from_options
from evalfleet.orchestrator.store import resolve_db_path
from evalfleet.service.security import (
    ModelRoots,
    check_forwarded_allow_ips,
    check_host,
    resolve_token,
    token_min_length,
)
from evalfleet.service.supervisor import SchedulerSupervisor
from evalfleet.service.watches import WatcherSupervisor, watcher_arguments
from evalfleet.types import EvalfleetError, UsageError


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8765
    db: str | None = None
    slots: int | None = None
    gpus: str | None = None
    ray: str | None = None
    token_file: str | None = None
    model_roots: list[str] = field(default_factory=list)
    task_roots: list[str] = field(default_factory=list)
    data_roots: list[str] = field(default_factory=list)
    allow_hub: bool = False
    forwarded_allow_ips: str | None = None
    interval: float = 2.0
    max_attempts: int = 3
    preempt: bool = False
    watch: list[str] = field(default_factory=list)
    watch_tasks: str | None = None
    watch_options: str | None = None


def scheduler_arguments(options: ServeOptions, db_path: Path) -> list[str] | None:
    """The `evalfleet scheduler` command line for the pool options, or None to serve the store only."""
    chosen = [name for name in ("slots", "gpus", "ray") if getattr(options, name) is not None]
    if len(chosen) > 1:
        raise UsageError(f"use one of --slots, --gpus or --ray, not {' and '.join('--' + c for c in chosen)}")
    if not chosen:
        return None
    if options.ray is not None and importlib.util.find_spec("evalfleet.orchestrator.executors.ray") is None:
        raise UsageError("--ray needs the Ray executor, which this evalfleet does not have")
    if options.ray is not None:
        from evalfleet.runtime.ray_ranks import check_reachable

        check_reachable(options.ray)  # before anything starts, as a bad --gpus spec is
    if options.ray is None:
        pool_from_options(options.gpus, options.slots)  # a bad spec is refused here, before anything starts
    pool = {"slots": "--slots", "gpus": "--gpus", "ray": "--ray"}[chosen[0]]
    return [sys.executable, "-m", "evalfleet.cli", "scheduler", "--db", str(db_path), pool,
            str(getattr(options, chosen[0])), "--interval", str(options.interval),
            "--max-attempts", str(options.max_attempts), "--preempt" if options.preempt else "--no-preempt"]


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise EvalfleetError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.listen(128)
    return sock


def serve(options: ServeOptions, say=print) -> None:
    try:
        import uvicorn

        from evalfleet.service.app import ServiceConfig, create_app
    except ImportError as error:
        raise EvalfleetError(f"evalfleet serve needs the service extra ({error.name} is missing): "
                             "pip install 'evalfleet[service]'") from None

    token = resolve_token(options.token_file)
    check_host(options.host, token)
    if options.forwarded_allow_ips is not None:
        check_forwarded_allow_ips(options.forwarded_allow_ips)
    if token.created:
        say(f"created a service token in {token.source} (readable by you only)")
    roots = ModelRoots(options.model_roots, allow_hub=options.allow_hub)
    db_path = resolve_db_path(options.db).resolve()
    command = scheduler_arguments(options, db_path)
    watch_commands = watcher_arguments(options.watch, options.watch_tasks, options.watch_options, db_path)
    app = create_app(ServiceConfig(db_path=db_path, token=token.value, token_file=token.path,
                                   token_min_length=token_min_length(options.host), model_roots=roots,
                                   task_roots=options.task_roots, data_roots=options.data_roots,
                                   forwarded_allow_ips=options.forwarded_allow_ips))
    sock = _listen(options.host, options.port)
    scheduler, watchers = None, []
    try:
        if command is not None:
            scheduler = app.state.scheduler = SchedulerSupervisor(command, db_path, say)
        for folder, watch_command in watch_commands:
            watchers.append(WatcherSupervisor(folder, watch_command, db_path, say))
        port = sock.getsockname()[1]
        shown_host = f"[{options.host}]" if ":" in options.host else options.host
        say(f"evalfleet serve (pid {os.getpid()}) on http://{shown_host}:{port}/ over {db_path}; "
            f"token from {token.source}; " + ("scheduler pid " + str(scheduler.pid) if scheduler else
                                               "no scheduler (another process schedules)") + "; Ctrl-C stops it")
        sys.stdout.flush()
        # proxy headers are the app's to believe (only from --forwarded-allow-ips), not uvicorn's
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                                proxy_headers=False)
        # uvicorn shuts down gracefully on SIGTERM, then raises the signal again: end with the
        # scheduler stopped (below), not killed by the default handler.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        for watcher in watchers:
            watcher.stop()
        if scheduler is not None:
            scheduler.stop()
        say("evalfleet serve stopped")
