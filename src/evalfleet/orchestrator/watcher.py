"""`evalfleet watch`: evaluate each checkpoint a trainer writes under a folder, once it is whole.

A watch is a group of kind 'watch', one per folder + tasks + score-changing settings (`groups.key_text`
of its template request, so a restarted watcher finds its group again). Each checkpoint's state lives
in the job store (`watch_checkpoints`), so a watcher killed at any moment and started again, or a
scheduler restarted under it, submits nothing twice:

    waiting ──whole──▶ submitting ──▶ submitted ──its job ends, same files──▶ evaluated
                                          │ its job ends, files changed
                                          ▼
                                      rewritten ──whole and quiet──▶ submitting ──▶ re-evaluating ──▶ …
    waiting / submitted / rewritten / re-evaluating ──folder gone──▶ deleted

`submitting` is written before the submit and the job id after it: a watcher killed between the two
adopts the job from its group on restart (same model path, submitted after the row) instead of
submitting again. A lock file next to the store keeps one process per watch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from evalfleet.orchestrator.checkpoints import (
    DEFAULT_MARKERS,
    QuietClock,
    check_step_regex,
    checkpoint_step,
    completeness,
    fingerprint,
)
from evalfleet.orchestrator.console import cancel_job, submit_job
from evalfleet.orchestrator.groups import covering_job, key_text
from evalfleet.orchestrator.states import JobState
from evalfleet.orchestrator.store import CheckpointRecord, JobStore, resolve_db_path
from evalfleet.types import EvalfleetError, EvaluationRequest, UsageError

IN_FLIGHT = ("submitted", "re-evaluating")
WAITING = ("waiting", "rewritten")


@dataclass(frozen=True)
class WatchSpec:
    """What to watch and how to evaluate what appears: `request` is the template (its model is the folder)."""

    folder: Path
    request: EvaluationRequest
    marker: str | None = None
    quiet_s: float = 60.0
    step_regex: str | None = None

    @classmethod
    def of(cls, folder: str, request: EvaluationRequest, **options: Any) -> WatchSpec:
        resolved = Path(folder).expanduser().resolve()
        if not resolved.is_dir():
            raise UsageError(f"{folder} is not a folder; watch the folder the trainer writes its checkpoints into")
        return cls(resolved, request.model_copy(update={"model": request.model.model_copy(
            update={"path": str(resolved)})}), **options)

    @property
    def key(self) -> str:
        return key_text(self.request)

    def request_for(self, checkpoint: str) -> EvaluationRequest:
        return self.request.model_copy(update={"model": self.request.model.model_copy(update={"path": checkpoint})})

    def document(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "tasks": self.request.tasks.names, "key": self.key,
                "request": self.request.model_dump(mode="json"), "marker": self.marker, "quiet_s": self.quiet_s,
                "step_regex": self.step_regex}


def find_or_create_watch(store: JobStore, spec: WatchSpec) -> str:
    """The watch group of `spec` (same folder, tasks and settings), created the first time."""
    for group in store.groups("watch"):
        if group.spec.get("key") == spec.key:
            return group.id
    name = f"watch {spec.folder.name}: {','.join(spec.request.tasks.names)}"
    return store.create_group("watch", name, spec.document())


@contextlib.contextmanager
def watch_lock(db_path: Path, spec: WatchSpec) -> Iterator[None]:
    """One watcher per watch: two would both submit the same checkpoint."""
    digest = hashlib.sha256(spec.key.encode()).hexdigest()[:12]
    with open(db_path.with_name(f"{db_path.name}.watch-{digest}.lock"), "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise EvalfleetError(f"{spec.folder} is already watched with these tasks and settings "
                                 f"(pid {holder})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def checkpoint_folders(folder: Path, pattern: str | None) -> dict[str, int] | None:
    """Each subfolder whose name holds a step (hidden ones are a trainer's scratch); None if `folder` is gone."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return None
    found = {}
    for entry in entries:
        step = None if entry.name.startswith(".") else checkpoint_step(entry.name, pattern)
        if step is not None and entry.is_dir():
            found[str(folder / entry.name)] = step
    return found


class Watcher:
    """One watch's checkpoints, looked at by `poll`; every decision is written to the store first."""

    def __init__(self, store: JobStore, db: str, spec: WatchSpec, watch_id: str,
                 say: Callable[[str], None] = print, clock: Callable[[], float] = time.time) -> None:
        self.store, self.db, self.spec, self.watch_id, self.say, self.clock = store, db, spec, watch_id, say, clock
        self.quiet = QuietClock()
        self.markers = (spec.marker,) if spec.marker else DEFAULT_MARKERS
        self.started_at = clock()
        self._first = True
        self._folder_gone = False

    def poll(self) -> int:
        """One look at the folder; returns how many checkpoints wait to be whole."""
        now = self.clock()
        self.store.beat_watcher(self.watch_id, os.getpid(), self.started_at, now)
        rows = {row.path: row for row in self.store.checkpoints(self.watch_id)}
        present = checkpoint_folders(self.spec.folder, self.spec.step_regex)
        if present is None:
            if not self._folder_gone:
                self.say(f"{self.spec.folder} is gone; waiting for it to come back")
            self._folder_gone = True
            return 0
        self._folder_gone = False
        if self._first:
            for row in rows.values():
                self._tell_known(row)
            self._first = False
        steps = {**{path: row.step for path, row in rows.items()}, **present}
        waiting = 0
        for path in sorted(steps, key=lambda p: (steps[p] if steps[p] is not None else -1, p)):
            row = rows.get(path)
            if path not in present:
                if row is not None:
                    self._gone(row)
                continue
            waiting += self._look(path, present[path], row, now)
        return waiting

    # one checkpoint ------------------------------------------------------------------------------

    def _look(self, path: str, step: int, row: CheckpointRecord | None, now: float) -> int:
        state = row.state if row is not None else None
        if state in IN_FLIGHT:
            self._settle(row)
            return 0
        if state == "submitting":
            self._recover(row)
            return 0
        if state not in (None, *WAITING, "deleted"):  # evaluated, refused
            return 0
        if row is None and self._covered(path, step):
            return 0
        files = fingerprint(path, self.markers)
        unchanged_s = self.quiet.unchanged_for(path, files, now)
        rewritten = row is not None and row.evaluations > 0
        whole = completeness(path, marker=self.spec.marker, unchanged_s=unchanged_s, quiet_s=self.spec.quiet_s,
                             rewritten=rewritten)
        if not whole.complete:
            if state in (None, "deleted"):
                again = "rewritten" if rewritten else "waiting"
                self._put(path, step, again, row, note=whole.why)
                self.say(f"found step {step} ({Path(path).name}): waiting until it is complete ({whole.why})")
            return 1
        self._submit(path, step, row, files, whole.why)
        return 0

    def _covered(self, path: str, step: int) -> bool:
        """A checkpoint first seen that a job (from a sweep, a submit, a former watch) already covers."""
        job = covering_job(self.store, self.spec.request_for(str(Path(path).resolve())))
        if job is None:
            return False
        state = "evaluated" if job.state is JobState.SUCCEEDED else "submitted"
        self.store.put_checkpoint(self.watch_id, path, step, state, fingerprint=fingerprint(path, self.markers),
                                  job_id=job.id, note=f"covered by job {job.id}")
        self.say(f"step {step} ({Path(path).name}): skipped, already evaluated with these settings by job {job.id} "
                 f"({job.state.value})")
        return True

    def _submit(self, path: str, step: int, row: CheckpointRecord | None, files: str | None, why: str) -> None:
        evaluations = row.evaluations if row is not None else 0
        self._put(path, step, "submitting", row, fingerprint=files, note=why)
        try:
            job_id = submit_job(self.spec.request_for(path), self.db, group_id=self.watch_id)
        except EvalfleetError as error:
            self._put(path, step, "refused", row, fingerprint=files, note=str(error))
            self.say(f"step {step} ({Path(path).name}) was not submitted: {error}")
            return
        state = "re-evaluating" if evaluations else "submitted"
        self._put(path, step, state, row, fingerprint=files, job_id=job_id, evaluations=evaluations + 1, note=why)
        verb = "re-evaluating step" if evaluations else "found step"
        self.say(f"{verb} {step} ({Path(path).name}) complete ({why}) -> job {job_id}")

    def _recover(self, row: CheckpointRecord) -> None:
        """A submit cut short: adopt its job if it reached the store, else wait to submit again."""
        model = str(Path(row.path).resolve())
        jobs = [job for job in self.store.jobs_in_group(self.watch_id)
                if job.request["model"]["path"] == model and job.submitted_at >= row.updated_at]
        if jobs:
            state = "re-evaluating" if row.evaluations else "submitted"
            self._put(row.path, row.step, state, row, fingerprint=row.fingerprint, job_id=jobs[-1].id,
                      evaluations=row.evaluations + 1, note=row.note)
            self.say(f"step {row.step} ({Path(row.path).name}): adopted job {jobs[-1].id}, submitted before a restart")
        else:
            self._put(row.path, row.step, "rewritten" if row.evaluations else "waiting", row, note="submit interrupted")

    def _settle(self, row: CheckpointRecord) -> None:
        """Its job has ended: the same files are evaluated; changed ones are evaluated again once whole."""
        try:
            job = self.store.get(row.job_id)
        except UsageError:
            job = None
        if job is not None and not job.state.terminal:
            return
        name, ended = Path(row.path).name, job.state.value if job is not None else "gone"
        if fingerprint(row.path, self.markers) == row.fingerprint:
            self._put(row.path, row.step, "evaluated", row, note=f"job {row.job_id} {ended}")
            self.say(f"step {row.step} ({name}) evaluated: job {row.job_id} {ended}")
            return
        self._put(row.path, row.step, "rewritten", row, note=f"files changed while job {row.job_id} evaluated it")
        self.say(f"step {row.step} ({name}) changed while job {row.job_id} evaluated it ({ended}); "
                 f"re-evaluating it once it is complete")

    def _gone(self, row: CheckpointRecord) -> None:
        self.quiet.forget(row.path)
        if row.state in ("evaluated", "refused", "deleted"):  # a trainer pruning old checkpoints is no news
            return
        name = Path(row.path).name
        job = None
        if row.job_id is not None and row.state not in WAITING:
            with contextlib.suppress(UsageError):
                job = self.store.get(row.job_id)
        if job is None or job.state.terminal:
            when = "before its evaluation" if job is None else f"before job {job.id} was settled ({job.state.value})"
        else:
            when = f"during its evaluation by job {job.id} ({job.state.value})"
            if job.state is JobState.QUEUED:
                with contextlib.suppress(EvalfleetError):
                    cancel_job(job.id, self.db)
                    when += "; cancelled it"
        self._put(row.path, row.step, "deleted", row, note=f"deleted {when}")
        self.say(f"step {row.step} ({name}) was deleted {when}")

    def _tell_known(self, row: CheckpointRecord) -> None:
        """What a restarted watcher finds already done, so its log says why it submits nothing."""
        name = f"step {row.step} ({Path(row.path).name})"
        if row.state == "evaluated":
            self.say(f"{name}: skipped, already evaluated by job {row.job_id}")
        elif row.state in IN_FLIGHT:
            self.say(f"{name}: job {row.job_id} already submitted")

    def _put(self, path: str, step: int | None, state: str, row: CheckpointRecord | None, *,
             fingerprint: str | None = None, job_id: str | None = None, evaluations: int | None = None,
             note: str | None = None) -> None:
        """Write a checkpoint's new state; what is not given stays as `row` had it."""
        self.store.put_checkpoint(
            self.watch_id, path, step, state,
            fingerprint=fingerprint if fingerprint is not None else (row.fingerprint if row else None),
            job_id=job_id if job_id is not None else (row.job_id if row else None),
            evaluations=evaluations if evaluations is not None else (row.evaluations if row else 0),
            note=note, now=self.clock())


def run_watch(spec: WatchSpec, db_path: Path, *, every_s: float, once: bool,
              say: Callable[[str], None] = print) -> None:
    """Watch until interrupted (with `once`: submit what is whole now, observing up to the quiet period)."""
    with watch_lock(db_path, spec), JobStore(db_path) as store:
        watch_id = find_or_create_watch(store, spec)
        say(f"watching {spec.folder} for checkpoints (watch {watch_id}, pid {os.getpid()}): "
            f"tasks {','.join(spec.request.tasks.names)}, every {every_s:g}s, "
            + (f"complete when {spec.marker} exists" if spec.marker else
               f"complete with a marker ({', '.join(DEFAULT_MARKERS)}) or {spec.quiet_s:g}s without changes"))
        watcher = Watcher(store, str(db_path), spec, watch_id, say)
        deadline = None
        while True:
            try:
                waiting = watcher.poll()
            except (sqlite3.Error, OSError) as error:  # a busy store, a folder that moved: look again later
                waiting = 0
                say(f"look at {spec.folder} failed ({type(error).__name__}: {error}); again in {every_s:g}s")
            if once:
                deadline = deadline if deadline is not None else time.monotonic() + spec.quiet_s + every_s
                if not waiting or time.monotonic() >= deadline:
                    return
            time.sleep(every_s)


# what `watch --status` and GET /api/v1/watches show ---------------------------------------------


def watch_documents(store: JobStore, folder: Path | None = None) -> list[dict[str, Any]]:
    """Every watch (of `folder`), oldest first: its spec, its latest process, its checkpoints with their jobs."""
    processes = store.watchers()
    documents = []
    for group in store.groups("watch"):
        if folder is not None and group.spec.get("folder") != str(folder):
            continue
        checkpoints = []
        for row in store.checkpoints(group.id):
            job_state = None
            if row.job_id is not None:
                with contextlib.suppress(UsageError):
                    job_state = store.get(row.job_id).state.value
            checkpoints.append({"path": row.path, "step": row.step, "state": row.state, "job_id": row.job_id,
                                "job_state": job_state, "evaluations": row.evaluations, "note": row.note,
                                "seen_at": row.seen_at, "updated_at": row.updated_at})
        documents.append({"id": group.id, "name": group.name, "folder": group.spec.get("folder"),
                          "tasks": group.spec.get("tasks", []), "created_at": group.created_at,
                          "watcher": processes.get(group.id), "checkpoints": checkpoints})
    return documents


def watch_tables(documents: list[dict[str, Any]], now: float) -> list[Table]:
    tables = []
    for watch in documents:
        process = watch["watcher"]
        seen = (f"watcher pid {process['pid']}, last look {now - process['heartbeat_at']:.0f}s ago" if process
                else "never watched")
        table = Table(title=f"watch {watch['id']}: {watch['folder']} ({','.join(watch['tasks'])}; {seen})",
                      box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("step", "checkpoint", "state", "job", "job state", "evaluations", "note"):
            table.add_column(column)
        for row in watch["checkpoints"]:
            table.add_row(str(row["step"]), Path(row["path"]).name, row["state"], row["job_id"] or "-",
                          row["job_state"] or "-", str(row["evaluations"]), row["note"] or "")
        tables.append(table)
    return tables


def watch_command(folder: str, request: EvaluationRequest | None, db: str | None, *, every_s: float,
                  marker: str | None, quiet_s: float, step_regex: str | None, once: bool, status: bool,
                  as_json: bool) -> None:
    """`evalfleet watch`: the folder's watches with --status, else watch it with `request`'s tasks and settings."""
    db_path = resolve_db_path(db)
    if status:
        resolved = Path(folder).expanduser().resolve()
        with JobStore(db_path) as store:
            documents = watch_documents(store, resolved)
        if as_json:
            print(json.dumps(documents, indent=2))
            return
        if not documents:
            raise UsageError(f"{resolved} has no watch in {db_path}")
        console = Console(width=160)
        for table in watch_tables(documents, time.time()):
            console.print(table)
        return
    if request is None:
        raise UsageError("--tasks is required to watch a folder (name the lm-eval tasks to evaluate each checkpoint on)")
    if step_regex is not None:
        check_step_regex(step_regex)
    spec = WatchSpec.of(folder, request, marker=marker, quiet_s=quiet_s, step_regex=step_regex)

    def say(line: str) -> None:
        print(line, flush=True)

    run_watch(spec, db_path, every_s=every_s, once=once, say=say)
