"""The job store: one SQLite file shared by the scheduler, its workers and the CLI.

WAL mode lets readers (status, queue) run while a writer commits; every write is one
`BEGIN IMMEDIATE` transaction under a busy timeout, so concurrent processes serialize
instead of failing. Opening a store whose schema is current only reads, so an open never
queues behind (or blocks) the writers. Each state change is checked against
`states.TRANSITIONS` and logged in `events` in the same transaction, so the history never
disagrees with the job row.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from evalfleet.orchestrator.states import JobState, check_transition
from evalfleet.types import EvalfleetError, UsageError

Device = tuple[int, int]

_SCHEMA_V1 = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    request TEXT NOT NULL,
    priority TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    demand TEXT,
    plan TEXT,
    placement TEXT,
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER,
    tokens_per_s REAL,
    submitted_at REAL NOT NULL,
    enqueued_at REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0,
    started_at REAL,
    finished_at REAL,
    heartbeat_at REAL,
    error TEXT,
    owner TEXT,
    pid INTEGER,
    handle TEXT,
    result_path TEXT
);
CREATE INDEX jobs_state ON jobs(state);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    reason TEXT
);
CREATE INDEX events_job ON events(job_id);
CREATE TABLE device_failures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node INTEGER NOT NULL,
    gpu INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    reason TEXT
);
CREATE TABLE quarantine (
    node INTEGER NOT NULL,
    gpu INTEGER NOT NULL,
    at REAL NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (node, gpu)
);
"""

# v2: workers report requests/s (for ETAs); the scheduler records its pool for `submit`.
_SCHEMA_V2 = """
ALTER TABLE jobs ADD COLUMN requests_per_s REAL;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)
"""


def _run_script(script: str) -> Callable[[sqlite3.Connection], None]:
    return lambda conn: [conn.execute(statement) for statement in script.split(";") if statement.strip()]


# MIGRATIONS[i] brings a database from user_version i to i + 1. Append, never edit.
# Each step runs inside the migration's transaction (so not via executescript, which commits).
# v3: a worker's exit report (failure class, reason, device evidence); which model failed on a
# device and on what evidence; the evidence a quarantine rests on.
_SCHEMA_V3 = """
ALTER TABLE jobs ADD COLUMN failure TEXT;
ALTER TABLE device_failures ADD COLUMN model TEXT;
ALTER TABLE device_failures ADD COLUMN evidence TEXT;
ALTER TABLE quarantine ADD COLUMN evidence TEXT
"""

# v4: a job's size at submit (requests by type and tokens, counted or modeled; see engines/job_size.py).
_SCHEMA_V4 = """
ALTER TABLE jobs ADD COLUMN size TEXT
"""

# v5: a running job's live replicas and the scheduler's orders to add or drop one (see `Resize`).
_SCHEMA_V5 = """
ALTER TABLE jobs ADD COLUMN resize TEXT
"""

# v6: when a running job's computed requests last moved, and its slowest measured batch (the longest
# gap between two moves), so the scheduler can tell a stalled job from a slow one (`scheduler.StallBounds`).
_SCHEMA_V6 = """
ALTER TABLE jobs ADD COLUMN progress_at REAL;
ALTER TABLE jobs ADD COLUMN slowest_batch_s REAL
"""

# v7: a requeued job's failures in a row without progress (its retry waits only from the second on)
# and the devices its last failed attempt held (placed elsewhere where there is room); see `recovery`.
_SCHEMA_V7 = """
ALTER TABLE jobs ADD COLUMN failure_streak INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN avoid TEXT
"""

# v8: groups of jobs submitted as one (a sweep's matrix, a checkpoint watch); see `orchestrator/groups.py`.
_SCHEMA_V8 = """
CREATE TABLE groups (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT,
    spec TEXT NOT NULL,
    created_at REAL NOT NULL
);
ALTER TABLE jobs ADD COLUMN group_id TEXT;
CREATE INDEX jobs_group ON jobs(group_id)
"""

# v9: the checkpoints a watch (a group of kind 'watch') has seen: their state, the job evaluating each and
# the fingerprint of its files at submit; and the live process of each watch (see `orchestrator/watcher.py`).
_SCHEMA_V9 = """
CREATE TABLE watch_checkpoints (
    watch_id TEXT NOT NULL,
    path TEXT NOT NULL,
    step INTEGER,
    state TEXT NOT NULL,
    fingerprint TEXT,
    job_id TEXT,
    evaluations INTEGER NOT NULL DEFAULT 0,
    note TEXT,
    seen_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (watch_id, path)
);
CREATE TABLE watchers (
    watch_id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL
)
"""

MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _run_script(_SCHEMA_V1), _run_script(_SCHEMA_V2), _run_script(_SCHEMA_V3), _run_script(_SCHEMA_V4),
    _run_script(_SCHEMA_V5), _run_script(_SCHEMA_V6), _run_script(_SCHEMA_V7),
    _run_script(_SCHEMA_V8), _run_script(_SCHEMA_V9),
]
SCHEMA_VERSION = len(MIGRATIONS)

_JSON_COLUMNS = ("request", "demand", "plan", "placement", "handle", "failure", "size", "resize", "avoid")
# Columns a transition may set alongside the state; everything else has its own method.
_TRANSITION_FIELDS = frozenset(
    {"placement", "pid", "handle", "owner", "error", "not_before", "enqueued_at", "started_at",
     "finished_at", "heartbeat_at", "result_path", "attempts", "failure", "resize", "progress_at",
     "slowest_batch_s", "failure_streak", "avoid"}
)


@dataclass(frozen=True)
class JobRecord:
    id: str
    request: dict[str, Any]
    priority: str
    state: JobState
    attempts: int
    max_attempts: int
    demand: dict[str, Any] | None
    plan: dict[str, Any] | None
    placement: list[Device] | None
    done: int
    total: int | None
    tokens_per_s: float | None
    submitted_at: float
    enqueued_at: float
    not_before: float
    started_at: float | None
    finished_at: float | None
    heartbeat_at: float | None
    error: str | None
    owner: str | None
    pid: int | None
    handle: dict[str, Any] | None
    result_path: str | None
    requests_per_s: float | None
    failure: dict[str, Any] | None
    """The worker's exit report of its last attempt (see `failures.ExitReport`), if it wrote one."""
    size: dict[str, Any] | None = None
    """The job's size at submit: requests by type and tokens, counted or modeled (`source`)."""
    resize: dict[str, Any] | None = None
    """Set by a worker whose replicas can join and leave while it runs (see `Resize`); None otherwise."""
    progress_at: float | None = None
    """When this attempt's computed requests last moved; None until its first batch is done."""
    slowest_batch_s: float | None = None
    """The longest gap between two such moves for the kind of request now running; None until there
    are two."""
    failure_streak: int = 0
    """Its failed attempts in a row that computed nothing (see `recovery.next_streak`)."""
    avoid: list[Device] | None = None
    """The devices its last failed attempt held: a retry goes elsewhere where there is room."""
    group_id: str | None = None
    """The group (a sweep, a checkpoint watch) it was submitted in, if any."""

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRecord:
        values = {name: row[name] for name in cls.__dataclass_fields__}
        for column in _JSON_COLUMNS:
            if values[column] is not None:
                values[column] = json.loads(values[column])
        for column in ("placement", "avoid"):
            if values[column] is not None:
                values[column] = [tuple(device) for device in values[column]]
        values["state"] = JobState(values["state"])
        return cls(**values)


@dataclass
class Resize:
    """A running job's live replicas, as its worker and the scheduler share them in the store.

    `replicas` maps each replica's name to its devices; `grow` and `shrink` are the
    scheduler's orders not yet taken by the worker; `joining` and `leaving` the devices of
    replicas being started or given back. A growth order adds its devices to the job's
    placement at once (so no other job takes them); a replica's devices leave the placement
    only when the worker says it is gone. `load_s` is how long a replica took to load here.
    """

    placement: list[Device] = field(default_factory=list)
    replicas: dict[str, list[Device]] = field(default_factory=dict)
    grow: list[dict[str, Any]] = field(default_factory=list)
    shrink: list[list[Device]] = field(default_factory=list)
    joining: list[list[Any]] = field(default_factory=list)
    leaving: list[list[Any]] = field(default_factory=list)
    load_s: float = 0.0

    @classmethod
    def load(cls, data: dict[str, Any], placement: list[Any]) -> Resize:
        def devices(listed: list[Any]) -> list[Device]:
            return [tuple(d) for d in listed]

        return cls(placement=devices(placement),
                   replicas={name: devices(d) for name, d in data.get("replicas", {}).items()},
                   grow=data.get("grow", []), shrink=[devices(d) for d in data.get("shrink", [])],
                   joining=[devices(d) for d in data.get("joining", [])],
                   leaving=[devices(d) for d in data.get("leaving", [])], load_s=data.get("load_s", 0.0))

    def dump(self) -> dict[str, Any]:
        def listed(devices: list[Device]) -> list[list[int]]:
            return [list(d) for d in devices]

        return {"replicas": {n: listed(d) for n, d in self.replicas.items()}, "grow": self.grow,
                "shrink": [listed(d) for d in self.shrink], "joining": [listed(d) for d in self.joining],
                "leaving": [listed(d) for d in self.leaving], "load_s": self.load_s}


@dataclass(frozen=True)
class GroupRecord:
    """Jobs submitted as one: `spec` is what made them (a sweep's file, a watch's folder)."""

    id: str
    kind: str
    name: str | None
    spec: dict[str, Any]
    created_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> GroupRecord:
        return cls(row["id"], row["kind"], row["name"], json.loads(row["spec"]), row["created_at"])


@dataclass(frozen=True)
class CheckpointRecord:
    """A checkpoint folder a watch has seen; `job_id` is its latest evaluation, `fingerprint` its files' then."""

    watch_id: str
    path: str
    step: int | None
    state: str
    fingerprint: str | None
    job_id: str | None
    evaluations: int
    note: str | None
    seen_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> CheckpointRecord:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Event:
    job_id: str
    at: float
    from_state: JobState | None
    to_state: JobState
    attempt: int
    reason: str | None
    id: int = 0


def resolve_db_path(explicit: str | os.PathLike[str] | None) -> Path:
    """`--db PATH`, else `$EVALFLEET_DB`, else `jobs.db` in the user's data folder."""
    if explicit:
        return Path(explicit).expanduser()
    from_env = os.environ.get("EVALFLEET_DB")
    if from_env:
        return Path(from_env).expanduser()
    return platformdirs.user_data_path("evalfleet") / "jobs.db"


class JobStore:
    """Jobs, their event history, device failures and quarantined devices, in one SQLite file."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            self._conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as error:
            raise EvalfleetError(f"cannot open the job store {self.path}: {error}") from None
        self._lock = threading.RLock()
        self._migrate()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: takes the write lock up front so read-then-write is atomic."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # a failed COMMIT leaves it open: the next write needs it closed
                    self._conn.execute("ROLLBACK")
                raise

    def _migrate(self) -> None:
        """Bring an older schema up to date; the write lock is taken only when there is something to do."""
        version = self.schema_version
        if version < SCHEMA_VERSION:
            with self._write() as conn:
                version = conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have done it
                if version < SCHEMA_VERSION:
                    for step in MIGRATIONS[version:]:
                        step(conn)
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        if version > SCHEMA_VERSION:
            raise EvalfleetError(
                f"the job store {self.path} has schema version {version}, newer than this evalfleet "
                f"understands ({SCHEMA_VERSION}); upgrade evalfleet"
            )

    @property
    def schema_version(self) -> int:
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    # jobs -----------------------------------------------------------------------------------

    def add(
        self,
        request: dict[str, Any],
        *,
        priority: str,
        max_attempts: int,
        demand: dict[str, Any] | None = None,
        plan: dict[str, Any] | None = None,
        size: dict[str, Any] | None = None,
        total: int | None = None,
        now: float | None = None,
        group_id: str | None = None,
    ) -> str:
        now = time.time() if now is None else now
        job_id = uuid.uuid4().hex[:12]
        with self._write() as conn:
            conn.execute(
                "INSERT INTO jobs (id, request, priority, state, max_attempts, demand, plan, size, total,"
                " submitted_at, enqueued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, json.dumps(request), priority, JobState.QUEUED.value, max_attempts,
                 _dumps(demand), _dumps(plan), _dumps(size), total, now, now),
            )
            if group_id is not None:
                conn.execute("UPDATE jobs SET group_id = ? WHERE id = ?", (group_id, job_id))
            _log(conn, job_id, now, None, JobState.QUEUED, 0, "submitted")
        return job_id

    def get(self, job_id: str) -> JobRecord:
        row = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UsageError(f"no job with id '{job_id}' in {self.path}")
        return JobRecord.from_row(row)

    def list(self, states: Iterable[JobState] | None = None) -> list[JobRecord]:
        query, args = "SELECT * FROM jobs", ()
        if states is not None:
            wanted = tuple(JobState(s).value for s in states)
            if not wanted:
                return []
            query += f" WHERE state IN ({','.join('?' * len(wanted))})"
            args = wanted
        rows = self._conn.execute(query + " ORDER BY submitted_at, id", args).fetchall()
        return [JobRecord.from_row(row) for row in rows]

    def transition(
        self,
        job_id: str,
        target: JobState,
        *,
        reason: str | None = None,
        expect: JobState | None = None,
        now: float | None = None,
        **fields: Any,
    ) -> JobRecord:
        """Move a job to `target`, setting `fields` in the same transaction.

        `expect` guards against races: if another process moved the job meanwhile, the
        transition is refused instead of overwriting that decision.
        """
        unknown = set(fields) - _TRANSITION_FIELDS
        if unknown:
            raise ValueError(f"transition cannot set {sorted(unknown)}")
        now = time.time() if now is None else now
        target = JobState(target)
        with self._write() as conn:
            row = conn.execute("SELECT state, attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UsageError(f"no job with id '{job_id}' in {self.path}")
            current = JobState(row["state"])
            if expect is not None and current is not expect:
                raise EvalfleetError(f"job {job_id} is {current.value}, not {expect.value} as expected")
            check_transition(job_id, current, target)
            if target.terminal:
                fields.setdefault("finished_at", now)
            if target is JobState.QUEUED:
                fields.setdefault("enqueued_at", now)
            if target is not JobState.RUNNING:  # replicas live only while their worker runs
                fields.setdefault("resize", None)
            columns = {"state": target.value, **{k: _encode(k, v) for k, v in fields.items()}}
            conn.execute(
                f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?",
                (*columns.values(), job_id),
            )
            _log(conn, job_id, now, current, target, fields.get("attempts", row["attempts"]), reason)
        return self.get(job_id)

    def update_progress(
        self,
        job_id: str,
        *,
        done: int,
        total: int | None = None,
        tokens_per_s: float | None = None,
        requests_per_s: float | None = None,
        progress_at: float | None = None,
        slowest_batch_s: float | None = None,
        now: float | None = None,
    ) -> None:
        """Workers report here; it doubles as their heartbeat. `progress_at` and `slowest_batch_s`
        (see `JobRecord`) are the scheduler's evidence of a stall: a `progress_at` of None keeps the
        last one, while `slowest_batch_s` is written as given (None: not measured for the kind of
        request now running)."""
        now = time.time() if now is None else now
        with self._write() as conn:
            conn.execute(
                "UPDATE jobs SET done = ?, total = COALESCE(?, total), tokens_per_s = COALESCE(?, tokens_per_s),"
                " requests_per_s = COALESCE(?, requests_per_s), progress_at = COALESCE(?, progress_at),"
                " slowest_batch_s = ?, heartbeat_at = ? WHERE id = ?",
                (done, total, tokens_per_s, requests_per_s, progress_at, slowest_batch_s, now, job_id),
            )

    def attach(self, job_id: str, *, pid: int | None, handle: dict[str, Any], now: float | None = None) -> bool:
        """Record a placed job's process without confirming it runs: its worker does that. False, and
        nothing written, where another process already holds the job (`worker.confirm_start`)."""
        with self._write() as conn:
            cursor = conn.execute("UPDATE jobs SET pid = ?, handle = ?, heartbeat_at = ? WHERE id = ?"
                                  " AND (pid IS NULL OR pid = ?)",
                                  (pid, json.dumps(handle), time.time() if now is None else now, job_id, pid))
            return cursor.rowcount == 1

    def report_error(self, job_id: str, message: str, failure: dict[str, Any] | None = None) -> None:
        """A worker's own account of why it is about to fail (and its exit report); the scheduler
        decides what follows."""
        with self._write() as conn:
            conn.execute("UPDATE jobs SET error = ?, failure = ? WHERE id = ?", (message, _dumps(failure), job_id))

    def heartbeat(self, job_id: str, now: float | None = None) -> None:
        with self._write() as conn:
            conn.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ?", (time.time() if now is None else now, job_id))

    def events(self, job_id: str | None = None, *, after: int = 0) -> list[Event]:
        """The history, oldest first; `after` skips events up to that id (for following it)."""
        query, args = "SELECT * FROM events WHERE id > ?", (after,)
        if job_id is not None:
            query, args = query + " AND job_id = ?", (after, job_id)
        rows = self._conn.execute(query + " ORDER BY id", args).fetchall()
        return [
            Event(r["job_id"], r["at"], r["from_state"] and JobState(r["from_state"]), JobState(r["to_state"]),
                  r["attempt"], r["reason"], r["id"])
            for r in rows
        ]

    # groups -----------------------------------------------------------------------------------

    def create_group(self, kind: str, name: str | None, spec: dict[str, Any], now: float | None = None) -> str:
        """A new group of jobs (`kind`: 'sweep' or 'watch'); its jobs name it at `add`."""
        group_id = uuid.uuid4().hex[:12]
        with self._write() as conn:
            conn.execute("INSERT INTO groups (id, kind, name, spec, created_at) VALUES (?, ?, ?, ?, ?)",
                         (group_id, kind, name, json.dumps(spec), time.time() if now is None else now))
        return group_id

    def group(self, group_id: str) -> GroupRecord:
        row = self._conn.execute("SELECT * FROM groups WHERE id = ?", (group_id,)).fetchone()
        if row is None:
            raise UsageError(f"no group with id '{group_id}' in {self.path}")
        return GroupRecord.from_row(row)

    def groups(self, kind: str | None = None) -> list[GroupRecord]:
        """Every group (of `kind`), oldest first."""
        query, args = "SELECT * FROM groups", ()
        if kind is not None:
            query, args = query + " WHERE kind = ?", (kind,)
        return [GroupRecord.from_row(row) for row in self._conn.execute(query + " ORDER BY created_at, id", args)]

    def jobs_in_group(self, group_id: str) -> list[JobRecord]:
        rows = self._conn.execute("SELECT * FROM jobs WHERE group_id = ? ORDER BY submitted_at, id", (group_id,))
        return [JobRecord.from_row(row) for row in rows]

    # checkpoint watches ----------------------------------------------------------------------

    def checkpoints(self, watch_id: str) -> list[CheckpointRecord]:
        """The checkpoints `watch_id` has seen, by step."""
        rows = self._conn.execute("SELECT * FROM watch_checkpoints WHERE watch_id = ? ORDER BY step, path", (watch_id,))
        return [CheckpointRecord.from_row(row) for row in rows]

    def put_checkpoint(self, watch_id: str, path: str, step: int | None, state: str, *,
                       fingerprint: str | None = None, job_id: str | None = None, evaluations: int = 0,
                       note: str | None = None, now: float | None = None) -> None:
        """Record a checkpoint's state (the time it was first seen is kept)."""
        now = time.time() if now is None else now
        with self._write() as conn:
            conn.execute(
                "INSERT INTO watch_checkpoints (watch_id, path, step, state, fingerprint, job_id, evaluations, note,"
                " seen_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (watch_id, path) DO UPDATE"
                " SET step = excluded.step, state = excluded.state, fingerprint = excluded.fingerprint,"
                " job_id = excluded.job_id, evaluations = excluded.evaluations, note = excluded.note,"
                " updated_at = excluded.updated_at",
                (watch_id, path, step, state, fingerprint, job_id, evaluations, note, now, now),
            )

    def beat_watcher(self, watch_id: str, pid: int, started_at: float, now: float | None = None) -> None:
        """The watch's process says it is alive."""
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO watchers (watch_id, pid, started_at, heartbeat_at) VALUES (?, ?, ?, ?)",
                         (watch_id, pid, started_at, time.time() if now is None else now))

    def watchers(self) -> dict[str, dict[str, Any]]:
        """Per watch id, its latest process: pid, started_at, heartbeat_at."""
        rows = self._conn.execute("SELECT * FROM watchers").fetchall()
        return {r["watch_id"]: {"pid": r["pid"], "started_at": r["started_at"], "heartbeat_at": r["heartbeat_at"]}
                for r in rows}

    # live replicas ---------------------------------------------------------------------------

    def open_resize(self, job_id: str, replicas: dict[str, list[Device]], load_s: float,
                    now: float | None = None) -> None:
        """A running worker says it can add and drop replicas, and which devices each one has."""
        def change(resize: Resize) -> str:
            resize.replicas = {name: [tuple(d) for d in devices] for name, devices in replicas.items()}
            resize.load_s = load_s
            return f"{len(replicas)} replica(s) that can grow and shrink (a replica loaded in {load_s:.1f}s)"

        self._resize(job_id, change, now, opening=True)

    def order_growth(self, job_id: str, devices: list[Device], env: dict[str, str], now: float | None = None) -> None:
        """The scheduler gives a running job one more replica: its devices are the job's from now on."""
        def change(resize: Resize) -> str:
            resize.placement.extend(tuple(d) for d in devices)
            resize.grow.append({"devices": [list(d) for d in devices], "env": env})
            return f"grows by a replica on {_devices_text(devices)}"

        self._resize(job_id, change, now)

    def order_shrink(self, job_id: str, devices: list[Device], reason: str, now: float | None = None) -> None:
        """The scheduler asks a running job to give back the replica on `devices` after its batch in hand."""
        def change(resize: Resize) -> str:
            resize.shrink.append([tuple(d) for d in devices])
            return f"asked to give back its replica on {_devices_text(devices)}: {reason}"

        self._resize(job_id, change, now)

    def take_orders(self, job_id: str) -> tuple[list[dict[str, Any]], list[list[Device]]]:
        """The worker takes the pending orders: (replicas to add with their env, replicas to drop)."""
        taken: tuple[list[dict[str, Any]], list[list[Device]]] = ([], [])

        def change(resize: Resize) -> None:
            nonlocal taken
            taken = ([{**g, "devices": [tuple(d) for d in g["devices"]]} for g in resize.grow], list(resize.shrink))
            resize.joining.extend(order["devices"] for order in taken[0])
            resize.leaving.extend(taken[1])
            resize.grow, resize.shrink = [], []

        self._resize(job_id, change, None, log=False)
        return taken

    def replica_joined(self, job_id: str, name: str, devices: list[Device], now: float | None = None) -> None:
        def change(resize: Resize) -> str:
            joined = [tuple(d) for d in devices]
            resize.joining = [d for d in resize.joining if d != joined]
            resize.replicas[name] = joined
            return f"{name} joined on {_devices_text(devices)}; {len(resize.replicas)} replica(s)"

        self._resize(job_id, change, now)

    def replica_kept(self, job_id: str, devices: list[Device], reason: str, now: float | None = None) -> None:
        """An order to give back the replica on `devices` was not carried out; the job keeps it."""
        kept = [tuple(d) for d in devices]

        def change(resize: Resize) -> str:
            resize.leaving = [d for d in resize.leaving if d != kept]
            return f"keeps its replica on {_devices_text(devices)}: {reason}"

        self._resize(job_id, change, now)

    def replica_left(self, job_id: str, devices: list[Device], reason: str, now: float | None = None) -> None:
        """The replica on `devices` is gone (given back, or it failed to join): the devices are free."""
        gone = [tuple(d) for d in devices]

        def change(resize: Resize) -> str:
            resize.placement[:] = [d for d in resize.placement if d not in gone]
            resize.joining = [d for d in resize.joining if d != gone]
            resize.leaving = [d for d in resize.leaving if d != gone]
            resize.replicas = {n: d for n, d in resize.replicas.items() if d != gone}
            return f"gave back {_devices_text(devices)}: {reason}"

        self._resize(job_id, change, now)

    def _resize(self, job_id: str, change: Callable[[Resize], str | None], now: float | None, *,
                opening: bool = False, log: bool = True) -> None:
        """Read-modify-write of a running job's replicas and placement in one transaction."""
        now = time.time() if now is None else now
        with self._write() as conn:
            row = conn.execute("SELECT state, attempts, placement, resize FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UsageError(f"no job with id '{job_id}' in {self.path}")
            if row["state"] != JobState.RUNNING.value or (row["resize"] is None and not opening):
                raise EvalfleetError(f"job {job_id} is {row['state']} without live replicas; it cannot be resized")
            resize = Resize.load(json.loads(row["resize"]) if row["resize"] else {},
                                 json.loads(row["placement"]) if row["placement"] else [])
            reason = change(resize)
            conn.execute("UPDATE jobs SET resize = ?, placement = ? WHERE id = ?",
                         (json.dumps(resize.dump()), json.dumps([list(d) for d in resize.placement]), job_id))
            if log and reason:
                _log(conn, job_id, now, JobState.RUNNING, JobState.RUNNING, row["attempts"], reason)

    # settings shared between processes ------------------------------------------------------

    def set_meta(self, key: str, value: Any) -> None:
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str) -> Any:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row["value"])

    # devices ----------------------------------------------------------------------------------

    def record_device_failure(self, device: Device, job_id: str, reason: str, *, since: float,
                              now: float | None = None, model: str | None = None,
                              evidence: list[str] | None = None) -> int:
        """Log that `job_id` (of `model`) failed on `device`; return how many distinct models
        (jobs, for rows without a model) failed there since `since`."""
        now = time.time() if now is None else now
        with self._write() as conn:
            conn.execute(
                "INSERT INTO device_failures (node, gpu, job_id, at, reason, model, evidence) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (device[0], device[1], job_id, now, reason, model, _dumps(evidence)),
            )
            return conn.execute(
                "SELECT COUNT(DISTINCT COALESCE(model, job_id)) FROM device_failures "
                "WHERE node = ? AND gpu = ? AND at >= ?",
                (device[0], device[1], since),
            ).fetchone()[0]

    def device_failures(self, device: Device, *, since: float) -> list[dict[str, Any]]:
        """The failures recorded on `device` since `since`, oldest first."""
        rows = self._conn.execute(
            "SELECT job_id, at, reason, model, evidence FROM device_failures WHERE node = ? AND gpu = ? AND at >= ? "
            "ORDER BY id", (device[0], device[1], since),
        ).fetchall()
        return [{"job_id": r["job_id"], "at": r["at"], "reason": r["reason"], "model": r["model"],
                 "evidence": json.loads(r["evidence"]) if r["evidence"] else []} for r in rows]

    def quarantine(self, device: Device, reason: str, now: float | None = None,
                   evidence: list[str] | None = None) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO quarantine (node, gpu, at, reason, evidence) VALUES (?, ?, ?, ?, ?)",
                (device[0], device[1], time.time() if now is None else now, reason, _dumps(evidence or [])),
            )

    def release(self, device: Device) -> bool:
        """Return a quarantined device to the pool; False if it was not quarantined."""
        with self._write() as conn:
            return conn.execute("DELETE FROM quarantine WHERE node = ? AND gpu = ?", device).rowcount > 0

    def quarantine_records(self) -> list[dict[str, Any]]:
        """Every quarantined device with when, why and on what evidence."""
        rows = self._conn.execute("SELECT node, gpu, at, reason, evidence FROM quarantine ORDER BY node, gpu").fetchall()
        return [{"device": (r["node"], r["gpu"]), "at": r["at"], "reason": r["reason"],
                 "evidence": json.loads(r["evidence"]) if r["evidence"] else []} for r in rows]

    def quarantined(self) -> dict[Device, str]:
        rows = self._conn.execute("SELECT node, gpu, reason FROM quarantine").fetchall()
        return {(r["node"], r["gpu"]): r["reason"] for r in rows}


def _devices_text(devices: list[Device]) -> str:
    return ", ".join(f"{n}:{g}" for n, g in devices)


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _encode(column: str, value: Any) -> Any:
    return _dumps(value) if column in _JSON_COLUMNS else value


def _log(conn: sqlite3.Connection, job_id: str, at: float, source: JobState | None, target: JobState,
         attempt: int, reason: str | None) -> None:
    conn.execute(
        "INSERT INTO events (job_id, at, from_state, to_state, attempt, reason) VALUES (?, ?, ?, ?, ?, ?)",
        (job_id, at, source.value if source else None, target.value, attempt, reason),
    )
