"""Checkpoint watches under `serve`: each `--watch` folder's watcher as a supervised child, and
GET /api/v1/watches.

A watcher runs as its own process (`evalfleet watch`), restarted when it exits, as `serve`'s
scheduler is: it keeps its lock and its state in the store, so a restart submits nothing twice.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel

from evalfleet.orchestrator.store import JobStore
from evalfleet.orchestrator.watcher import watch_documents
from evalfleet.service.supervisor import SchedulerSupervisor, start_scheduler
from evalfleet.types import UsageError


def watcher_arguments(folders: list[str], tasks: str | None, options: str | None,
                      db_path: Path) -> list[tuple[str, list[str]]]:
    """Per `--watch` folder, its `evalfleet watch` command line; a UsageError for flags that do not go together."""
    if not folders:
        if tasks is not None or options is not None:
            raise UsageError("--watch-tasks and --watch-options need --watch FOLDER")
        return []
    if tasks is None:
        raise UsageError("--watch needs --watch-tasks (the lm-eval tasks to evaluate each checkpoint on)")
    try:
        extra = shlex.split(options or "")
    except ValueError as error:
        raise UsageError(f"--watch-options cannot be read: {error}") from None
    folders = [str(Path(folder).expanduser().resolve()) for folder in folders]
    for folder in folders:
        if not Path(folder).is_dir():
            raise UsageError(f"--watch {folder} is not a folder")
    return [(folder, [sys.executable, "-m", "evalfleet.cli", "watch", folder, "--tasks", tasks, "--db", str(db_path),
                      *extra]) for folder in folders]


def _watching(store: JobStore, pid: int) -> bool:
    return any(process["pid"] == pid for process in store.watchers().values())


class WatcherSupervisor(SchedulerSupervisor):
    """One folder's `evalfleet watch`, started (ready once it has looked at the folder), restarted, stopped."""

    def __init__(self, folder: str, command: list[str], db_path: Path, say: Any = print) -> None:
        self.what = f"the watcher of {folder}"
        super().__init__(command, db_path, say)

    def _start(self, cancel: threading.Event | None = None) -> subprocess.Popen:
        return start_scheduler(self.command, self.db_path, cancel, ready=_watching, what=self.what)


# GET /api/v1/watches ----------------------------------------------------------------------------


class WatchedCheckpoint(BaseModel):
    path: str
    step: int | None
    state: Literal["waiting", "submitting", "submitted", "evaluated", "rewritten", "re-evaluating", "deleted",
                   "refused"]
    job_id: str | None
    job_state: str | None
    evaluations: int
    note: str | None
    seen_at: float
    updated_at: float


class WatcherProcess(BaseModel):
    pid: int
    started_at: float
    heartbeat_at: float


class Watch(BaseModel):
    id: str
    name: str | None
    folder: str | None
    tasks: list[str]
    created_at: float
    watcher: WatcherProcess | None
    checkpoints: list[WatchedCheckpoint]


def list_watches(request: Request) -> list[dict[str, Any]]:
    """Checkpoint watches (`evalfleet watch`, `serve --watch`), oldest first, with each checkpoint's state and job."""
    return watch_documents(request.app.state.fleet.store())
