"""Chaos soak: real jobs on a real `evalfleet scheduler` while a seeded schedule injects real faults.

The same jobs (the bundled demo model and tiny models built from configs with fixed seeds;
mixed sizes and priorities; some data-parallel, so they run worker-group ranks) run twice on
`evalfleet scheduler --slots 2` (local executor, SQLite store), each run with a fresh store and
request cache: first without faults (the reference), then while `random.Random(seed)` picks
the order of the faults and the pauses between them. Each fault waits for something it hits:

- `worker_kill`: SIGKILL of a job's worker process while it computes;
- `rank_kill`: SIGKILL of one rank process of a computing worker group;
- `scheduler_kill`: SIGKILL of the scheduler while a job runs, then a new scheduler, which must
  adopt the workers left running or requeue their jobs;
- `store_lock`: another sqlite3 connection's `BEGIN IMMEDIATE` on the job store, held (in a thread, the
  soak going on meanwhile: the disk fault lands while it is held) past the
  store's busy timeout while a job runs;
- `disk_full`: the results folder is a small tmpfs (`mount -t tmpfs`; where mount is refused,
  the job's results.json is made a link to /dev/full, a real ENOSPC too), filled while the job
  nearest its end computes and freed once an attempt has ended;
- `oom`: one rank's next batch of two or more requests fails as out of memory, which the worker
  group survives by halving its budget (the tests' `chaos:SECONDS:PATH` fault, through
  `EVALFLEET_TEST_FAULT` and `tests/faults/sitecustomize.py`; it also slows every rank batch by
  SECONDS in both runs, so that the faults have windows to land in).

With `--ray` the reference and the faulty run take place on a `ray.cluster_utils.Cluster` of
GPU-declaring nodes (`evalfleet scheduler --ray`), where a `node_swap` fault (twice by default)
removes one of a computing job's own nodes mid-job and adds another; the log says how many of the
job's replicas lived wholly elsewhere (they finish the job without it). The rank faults, which look
for local rank processes, are left out there.

Recovery is measured per fault, one per job at a time (a job hit is not hit again before it computes
again; other jobs may be, but faults that reach every job wait until none is recovering): from the fault (its end, for the lock held and the disk filled) to the
job's next completed batch, as its worker records it (`progress_at`, the moment its computed requests
moved); a job whose retry finds every request in the cache has no next batch, and its success counts
instead. The store's events split it into detection (the job requeued), the worker running again and
the first batch. For a data-parallel job whose rank was killed, the other replica's next batch counts:
the job did not stop (`through_scheduler` says whether a recovery took a new attempt).

A job "hung" is one not ended by the deadline while its worker is alive; "lost" is one missing
from the store or left in a non-terminal state with no worker. The run fails (exit 1) unless
every job succeeded with the reference's metrics and nothing was lost, hung or quarantined.

    python benchmarks/chaos.py [--seed 0] [--jobs 6] [--faults KIND,...] [--short] [--ray] [--out FILE]

Writes benchmarks/results/chaos.json (`--out`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))

from raycluster import lose_node  # noqa: E402
from tinymodels import build_tiny_model  # noqa: E402

from evalfleet.orchestrator import JobRecord, JobState, JobStore  # noqa: E402
from evalfleet.orchestrator.foreground import SchedulerOptions  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "chaos.json"
LOCAL_FAULTS = ("worker_kill", "rank_kill", "scheduler_kill", "store_lock", "disk_full", "oom")
RANK_FAULTS = ("rank_kill", "oom")
FLEET_FAULTS = ("scheduler_kill", "store_lock", "disk_full")
"""Faults that reach every job (the scheduler, the store, the disk): they wait until no job is recovering."""
LATE = ("store_lock", "disk_full")
"""Faults that wait for every other kind, in this order."""
BUSY_TIMEOUT_S = SchedulerOptions().busy_timeout_s
SCHEDULER_ARGS = ("--max-attempts", "10")
"""The scheduler as it runs by default (rounds every 2 s, a 30 s backoff from the second failure in a row
without progress), with room for the soak's attempts: a job may be hit by several faults."""
RECOVERY_POLL_S = 0.2
CONFIRM_S = {"local": 3.0, "ray": 10.0}
"""A recovery stands once this long passes without the job's attempt failing (on Ray, a lost node's
attempt fails a few seconds after its last batches on the other nodes)."""
TMPFS_BYTES = 8 * 2**20
BATCH_TOKENS = 256
"""Small batches of several requests: many batches (windows for the faults), and one that runs out of
memory can be halved (a batch of one request that runs out of memory fails its job: see the report)."""


@dataclass(frozen=True)
class JobSpec:
    name: str
    model: str
    tasks: str
    limit: int
    priority: str
    extra: tuple[str, ...] = ()

    def submit_args(self, models: dict[str, Path]) -> list[str]:
        model = str(models.get(self.model, self.model))
        return ["--model", model, "--tasks", self.tasks, "--limit", str(self.limit), "--priority", self.priority,
                "--max-batch-tokens", str(BATCH_TOKENS), *self.extra]


def job_mix(count: int, short: bool, rng: random.Random) -> list[JobSpec]:
    """Short: three jobs, two of them data-parallel (rank processes, whose batches the soak slows: windows
    for the faults). Else `count` jobs drawn from the seed, every other one data-parallel."""
    dp = ("--strategy", "dp")
    if short:
        return [JobSpec("demo-dp", "demo", "demo_mc,demo_arith,demo_ppl", 240, "normal", dp),
                JobSpec("neox-dp", "tiny-neox", "demo_mc,demo_arith", 60, "high", dp),
                JobSpec("llama", "tiny-llama", "demo_arith,demo_ppl", 20, "low")]
    tasks = ("demo_mc", "demo_arith", "demo_ppl", "demo_mc,demo_ppl", "demo_mc,demo_arith,demo_ppl")
    specs = []
    for n in range(count):
        model = rng.choice(("demo", "tiny-neox", "tiny-llama"))
        extra = dp if n % 2 == 0 else ()
        specs.append(JobSpec(f"job{n}-{model}", model, rng.choice(tasks), rng.choice((20, 40, 80)),
                             rng.choice(("high", "normal", "normal", "low")), extra))
    return specs


def build_models(folder: Path) -> dict[str, Path]:
    return {"tiny-neox": build_tiny_model(folder / "tiny-neox", "gpt_neox", seed=7),
            "tiny-llama": build_tiny_model(folder / "tiny-llama", "llama", seed=11)}


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _ranks(pid: int | None) -> list[psutil.Process]:
    if not _alive(pid):
        return []
    found = []
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "evalfleet.runtime.rank" in " ".join(child.cmdline()):
                    found.append(child)
    return found


def metrics_of(document: dict) -> dict[str, dict[str, float]]:
    return {task: {k: v for k, v in values.items() if "," in k and "_stderr" not in k}
            for task, values in document["results"].items()}


def metric_differences(reference: dict, other: dict) -> list[str]:
    """Counts and accuracies must match exactly; perplexities to 1e-6 relative (another batching
    moves the 7th digit of a sum of log-likelihoods, no more)."""
    left, right = metrics_of(reference), metrics_of(other)
    if left.keys() != right.keys():
        return [f"tasks differ: {sorted(left)} vs {sorted(right)}"]
    problems = []
    for task, metrics in left.items():
        for name, value in metrics.items():
            if name not in right[task]:
                problems.append(f"{task} {name}: missing")
                continue
            theirs = right[task][name]
            ratio = "perplexity" in name or "bits_per_byte" in name
            if not (math.isclose(value, theirs, rel_tol=1e-6) if ratio else value == theirs):
                problems.append(f"{task} {name}: {value} vs {theirs}")
    return problems


@dataclass
class Fleet:
    """One scheduler process (restartable) over one store, and the CLI against it."""

    folder: Path
    env: dict[str, str]
    pool_args: tuple[str, ...]
    process: subprocess.Popen | None = None
    workers: set[int] = field(default_factory=set)

    @property
    def db(self) -> Path:
        return self.folder / "jobs.db"

    @property
    def log(self) -> Path:
        return self.folder / "scheduler.log"

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "evalfleet.cli", *args, "--db", str(self.db)],
                              capture_output=True, text=True, timeout=timeout, env=self.env)

    def start(self) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "evalfleet.cli", "scheduler", "--db", str(self.db), *self.pool_args,
                 *SCHEDULER_ARGS], stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 120
        while "Ctrl-C stops it" not in self.log.read_text()[offset:]:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the scheduler did not start:\n{self.log.read_text()[offset:]}")
            time.sleep(0.1)

    def submit(self, spec: JobSpec, models: dict[str, Path]) -> str:
        done = self.cli("submit", *spec.submit_args(models))
        if done.returncode != 0:
            raise RuntimeError(f"submit {spec.name} failed: {done.stderr}")
        return done.stdout.strip()

    def records(self) -> dict[str, JobRecord]:
        with JobStore(self.db) as store:
            records = {record.id: record for record in store.list()}
        self.workers.update(r.pid for r in records.values() if r.pid)
        return records

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        for pid in self.workers:  # workers of a killed scheduler that nobody adopted
            if _alive(pid):
                with contextlib.suppress(psutil.Error):
                    psutil.Process(pid).kill()


class ResultsDisk:
    """The store's results folder on a small tmpfs of its own, which `fill` fills and `free` frees."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.filler, self.mounted = folder, folder / ".filler", False
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        self.mounted = done.returncode == 0
        self.method = "tmpfs" if self.mounted else "dev_full"
        self.mount_error = None if self.mounted else (done.stderr.strip() or f"mount exited {done.returncode}")
        self.links: list[Path] = []

    def fill(self, job_id: str) -> str:
        if not self.mounted:  # a real ENOSPC without a mount: the job's results.json writes to /dev/full
            target = self.folder / job_id / "results.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            target.symlink_to("/dev/full")
            self.links.append(target)
            return f"{target} -> /dev/full"
        written = 0
        with open(self.filler, "wb", buffering=0) as handle:
            for chunk in (2**20, 2**12):
                with contextlib.suppress(OSError):
                    while True:
                        written += handle.write(b"\0" * chunk)
        free = os.statvfs(self.folder).f_bavail * os.statvfs(self.folder).f_frsize
        return f"tmpfs of {TMPFS_BYTES // 2**20} MiB filled with {written} bytes, {free} left"

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)
        for link in self.links:
            if link.is_symlink():
                link.unlink()
        self.links.clear()

    def unmount(self) -> None:
        self.free()
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], capture_output=True)
            self.mounted = False


@dataclass
class Watched:
    kind: str
    job: str
    start: float
    """Wall time of the fault."""
    end: float
    """Wall time the fault ended (its start, for a kill)."""
    attempts: int
    """Its failed attempts when the fault hit."""
    recovered_at: float | None = None
    attempts_then: int | None = None
    """Its failed attempts when it recovered: more than at the fault if the recovery took a new attempt."""
    by: str | None = None
    """"batch" (the job's next completed batch) or "finished" (its retry found everything in the cache)."""
    failed: str | None = None
    found_at: float | None = None
    """When the recovery was seen; it stands once `CONFIRM_S` passes without the job's attempt failing."""
    confirmed: bool = False

    @property
    def open(self) -> bool:
        return not self.confirmed and self.failed is None


def _lateness(kind: str) -> int:
    return LATE.index(kind) + 1 if kind in LATE else 0


class RecoveryWatch:
    """Polls the store while the soak runs: for each fault, when its job next completed a batch."""

    def __init__(self, db: Path, confirm_s: float) -> None:
        self.db, self.watched, self.confirm_s = db, [], confirm_s
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="recovery-watch", daemon=True)
        self._thread.start()

    def add(self, kind: str, job: str, start: float, end: float, attempts: int) -> None:
        with self._lock:
            self.watched.append(Watched(kind, job, start, end, attempts))

    def _run(self) -> None:
        while not self._stop.wait(RECOVERY_POLL_S):
            with self._lock:
                open_ = [w for w in self.watched if w.open]
            if not open_:
                continue
            with contextlib.suppress(sqlite3.Error), JobStore(self.db) as store:  # the lock fault holds it
                for entry in open_:
                    self._follow(entry, store.get(entry.job))

    def _follow(self, entry: Watched, record: JobRecord) -> None:
        """A batch after the fault counts only if the attempt that computed it lives on: one that was
        computing elsewhere when its node was lost fails seconds later, and then the next attempt's
        first batch is the recovery."""
        if entry.recovered_at is not None and record.attempts > entry.attempts_then:
            entry.recovered_at = entry.by = entry.found_at = None
        if entry.recovered_at is None:
            this_attempt = record.started_at or 0.0  # a progress_at older than it is the last attempt's
            if (record.state is JobState.RUNNING and record.progress_at is not None
                    and record.progress_at > max(entry.end, this_attempt)):
                entry.recovered_at, entry.by = record.progress_at, "batch"
            elif record.state is JobState.SUCCEEDED:
                entry.recovered_at, entry.by = max(record.finished_at, entry.end), "finished"
            if entry.recovered_at is not None:
                entry.attempts_then, entry.found_at = record.attempts, time.time()
            elif record.state.terminal:
                entry.failed = f"{record.state.value}: {record.error}"
        elif record.state.terminal or time.time() - entry.found_at >= self.confirm_s:
            entry.confirmed = True

    def recovering(self) -> set[str]:
        """Jobs hit by a fault whose recovery is not yet seen, or not yet confirmed."""
        with self._lock:
            return {w.job for w in self.watched if w.open}

    def report(self, timeout_s: float) -> list[dict]:
        """Each fault's recovery, waiting up to `timeout_s` for those still open; then the watch stops."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(w.open for w in self.watched):
            time.sleep(RECOVERY_POLL_S)
        self.close()
        with JobStore(self.db) as store:
            return [self._describe(store, entry) for entry in self.watched]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _describe(store: JobStore, entry: Watched) -> dict:
        after = [e for e in store.events(entry.job) if e.at >= entry.start]
        first = {state: next((e.at for e in after if e.to_state is state and e.from_state is not state), None)
                 for state in (JobState.QUEUED, JobState.RUNNING)}

        def since(at: float | None) -> float | None:
            return None if at is None else round(at - entry.start, 2)

        return {"kind": entry.kind, "job": entry.job, "fault_lasted_s": round(entry.end - entry.start, 2),
                "recovery_s": None if entry.recovered_at is None else round(entry.recovered_at - entry.end, 2),
                "by": entry.by, "failed": entry.failed,
                "through_scheduler": (entry.attempts_then if entry.attempts_then is not None
                                      else store.get(entry.job).attempts) > entry.attempts,
                "requeued_after_s": since(first[JobState.QUEUED]), "running_after_s": since(first[JobState.RUNNING])}


def recovery_summary(recoveries: list[dict]) -> dict[str, dict]:
    """Per fault kind: how many recovered, and the median and max seconds from the fault to the next batch."""
    kinds: dict[str, list[dict]] = {}
    for entry in recoveries:
        kinds.setdefault(entry["kind"], []).append(entry)
    summary = {}
    for kind, entries in sorted(kinds.items()):
        times = [e["recovery_s"] for e in entries if e["recovery_s"] is not None]
        summary[kind] = {"faults": len(entries), "recovered": len(times),
                         "median_s": round(statistics.median(times), 2) if times else None,
                         "max_s": max(times) if times else None,
                         "through_scheduler": sum(e["through_scheduler"] for e in entries)}
    return summary


class Chaos:
    """The faults, each injected when it hits something (see the module's docstring)."""

    def __init__(self, fleet: Fleet, disk: ResultsDisk, oom_trigger: Path, rng: random.Random, t0: float,
                 watch: RecoveryWatch, ray: RayNodes | None = None) -> None:
        self.fleet, self.disk, self.oom_trigger, self.rng, self.t0, self.ray = fleet, disk, oom_trigger, rng, t0, ray
        self.watch = watch
        self.first_done: dict[tuple[str, int], int] = {}
        self.holders: list[threading.Thread] = []
        """Faults still under way in threads of their own (the held store lock)."""
        """Progress first seen for each attempt (job, worker pid): an attempt computes once it has moved."""

    def _pick(self, pick: Callable[[dict[str, JobRecord]], object]) -> object:
        return pick(self.fleet.records()) or None

    def _any_computing(self) -> JobRecord | None:
        return self._pick(lambda records: self.rng.choice(c) if (c := self._computing(records)) else None)

    def soak(self, faults: list[str], pause: tuple[float, float], deadline_s: float) -> list[dict]:
        """Inject `faults` in their order, each once it has something to hit; a fault with no target yet
        waits while later ones go ahead. The held lock comes after the others (held for 35 s in a thread,
        while the jobs run on), and the disk is filled last, while the lock is still held (it lets its job
        run to its end, whose results and account are then committed once the lock is gone)."""
        pending, injected = list(faults), []
        end = time.monotonic() + deadline_s
        while pending and time.monotonic() < end:
            records = self.fleet.records()
            if records and all(r.state.terminal for r in records.values()):
                break
            ranks_possible = any(not r.state.terminal and r.request.get("strategy") == "dp" for r in records.values())
            for kind in list(pending):
                if kind in RANK_FAULTS and not ranks_possible:
                    pending.remove(kind)
                    injected.append({"kind": kind, "hit": False, "why": "no data-parallel job left"})
                    continue
                if any(_lateness(k) < _lateness(kind) and not (k in RANK_FAULTS and not ranks_possible)
                       for k in pending):
                    continue
                if kind in FLEET_FAULTS and self.watch.recovering():  # it would slow every recovery under way
                    continue
                entry = getattr(self, kind)()
                if entry is not None:
                    pending.remove(kind)
                    injected.append({"kind": kind, **entry})
                    print(f"[chaos] {json.dumps(injected[-1])}", flush=True)
                    if kind != "store_lock":  # the disk is filled at once while the lock is held: a job that
                        time.sleep(self.rng.uniform(*pause))  # finished in between would commit unhurt
                    break
            else:
                time.sleep(0.1)
        injected += [{"kind": kind, "hit": False, "why": "nothing to hit before the jobs ended"} for kind in pending]
        for holder in self.holders:
            holder.join()
        return injected

    def _computing(self, records: dict[str, JobRecord]) -> list[JobRecord]:
        """Running jobs whose current attempt has computed something and has more to do (a record's
        progress outlives its attempt, so it must have moved since this attempt was first seen), and
        that are not recovering from an earlier fault (one recovery per job at a time, so that each is
        measured alone)."""
        found = []
        recovering = self.watch.recovering()
        for r in records.values():
            if r.state is not JobState.RUNNING or not _alive(r.pid) or r.id in recovering:
                continue
            first = self.first_done.setdefault((r.id, r.pid), r.done)
            if first < r.done < (r.total or 0):
                found.append(r)
        return found

    def _attempt_ended(self, job_id: str, after: float, timeout: float) -> str | None:
        """The reason the job's attempt running at `after` ended (None: still running at the timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with JobStore(self.fleet.db) as store:
                events = [e for e in store.events(job_id) if e.at >= after and e.from_state is JobState.RUNNING
                          and e.to_state is not JobState.RUNNING]  # running -> running: a replica resized
            if events:
                return f"{events[0].to_state.value}: {events[0].reason or ''}"
            time.sleep(0.2)
        return None

    def _at(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def worker_kill(self) -> dict | None:
        target = self._any_computing()
        if target is None:
            return None
        at, wall = self._at(), time.time()
        os.kill(target.pid, signal.SIGKILL)
        self.watch.add("worker_kill", target.id, wall, wall, target.attempts)
        ended = self._attempt_ended(target.id, wall - 1, 30)
        return {"at_s": at, "job": target.id, "pid": target.pid, "progress": [target.done, target.total],
                "hit": ended is not None, "outcome": ended}

    def rank_kill(self) -> dict | None:
        def pick(records):
            choices = [(r, rank) for r in self._computing(records) for rank in _ranks(r.pid)]
            return self.rng.choice(choices) if choices else None

        found = self._pick(pick)
        if found is None:
            return None
        record, rank = found
        at, wall = self._at(), time.time()
        with contextlib.suppress(psutil.Error):
            rank.kill()
        self.watch.add("rank_kill", record.id, wall, wall, record.attempts)
        time.sleep(3)
        after = self.fleet.records().get(record.id)
        return {"at_s": at, "job": record.id, "rank_pid": rank.pid, "progress": [record.done, record.total],
                "hit": True, "job_after": after.state.value if after else "missing",
                "worker_alive_after": _alive(record.pid)}

    def scheduler_kill(self) -> dict | None:
        target = self._any_computing()
        if target is None:
            return None
        at, wall = self._at(), time.time()
        self.fleet.process.kill()
        self.fleet.process.wait(30)
        self.watch.add("scheduler_kill", target.id, wall, wall, target.attempts)
        pause = round(self.rng.uniform(0.5, 2.0), 2)
        time.sleep(pause)
        survived = _alive(target.pid)
        self.fleet.start()
        time.sleep(2)
        after = self.fleet.records()[target.id]
        adopted = after.state is JobState.RUNNING and after.pid == target.pid
        return {"at_s": at, "job": target.id, "restart_after_s": pause, "hit": True, "worker_survived": survived,
                "job_after_restart": "adopted" if adopted else after.state.value}

    def store_lock(self) -> dict | None:
        """Take the store's write lock and hold it past its busy timeout in a thread of its own, so the
        soak goes on meanwhile: the disk is filled while the lock is held, and a job's results (or its
        account of the full disk) are committed while another writer holds the store."""
        target = self._any_computing()
        if target is None:
            return None
        hold = BUSY_TIMEOUT_S + 5
        entry = {"at_s": self._at(), "job": target.id, "held_s": hold, "busy_timeout_s": BUSY_TIMEOUT_S, "hit": True}
        conn = sqlite3.connect(self.fleet.db, isolation_level=None, timeout=60, check_same_thread=False)
        conn.execute("BEGIN IMMEDIATE")  # taken here, so the soak goes on only once the store is locked
        start = time.time()

        def hold_then_release() -> None:
            try:
                time.sleep(hold)
                conn.execute("ROLLBACK")
            finally:
                conn.close()
            self.watch.add("store_lock", target.id, start, time.time(), target.attempts)
            entry["scheduler_log_failed_rounds"] = self.fleet.log.read_text().count("round failed (")

        holder = threading.Thread(target=hold_then_release, name="store-lock", daemon=True)
        holder.start()
        self.holders.append(holder)
        return entry

    def disk_full(self) -> dict | None:
        def nearest_end(records):
            computing = self._computing(records)
            return max(computing, key=lambda r: r.done / r.total) if computing else None

        target = self._pick(nearest_end)
        if target is None:
            return None
        at, wall = self._at(), time.time()
        detail = self.disk.fill(target.id)
        try:
            ended = self._first_attempt_end(wall, 180)  # whichever job writes its results first meets the full disk
        finally:
            self.disk.free()
        if ended is not None:
            self.watch.add("disk_full", ended[0], wall, time.time(), self.fleet.records()[ended[0]].attempts - 1)
        return {"at_s": at, "freed_at_s": self._at(), "job": ended[0] if ended else target.id,
                "method": self.disk.method, "detail": detail, "outcome": ended[1] if ended else None,
                "hit": ended is not None and "No space left" in ended[1]}

    def _first_attempt_end(self, after: float, timeout: float) -> tuple[str, str] | None:
        """The first attempt to end on the full disk after `after`; a job whose results were written before
        the fill (its commit waiting behind the held lock) ends well and is passed over. Without one before
        the timeout or the last job's end: the first attempt that ended, if any."""
        deadline, first = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            with JobStore(self.fleet.db) as store:
                for e in store.events(after=0):
                    if e.at >= after and e.from_state is JobState.RUNNING and e.to_state is not JobState.RUNNING:
                        ended = e.job_id, f"{e.to_state.value}: {e.reason or ''}"
                        if "No space left" in ended[1]:
                            return ended
                        first = first or ended
                if all(j.state.terminal for j in store.list()):
                    return first
            time.sleep(0.2)
        return first

    def oom(self) -> dict | None:
        def pick(records):
            choices = [r for r in self._computing(records) if _ranks(r.pid)]
            return self.rng.choice(choices) if choices else None

        target = self._pick(pick)
        if target is None:
            return None
        at, wall = self._at(), time.time()
        self.oom_trigger.touch()
        deadline = time.monotonic() + 60
        while self.oom_trigger.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        hit = not self.oom_trigger.exists()
        if hit:
            self.watch.add("oom", target.id, wall, time.time(), target.attempts)
        self.oom_trigger.unlink(missing_ok=True)
        return {"at_s": at, "job": target.id, "progress": [target.done, target.total], "hit": hit}

    def node_swap(self) -> dict | None:
        if self.ray is None:
            return {"hit": False, "why": "not on Ray"}
        from evalfleet.orchestrator.pool_status import job_ranks

        def placed(records: dict[str, JobRecord]) -> tuple[JobRecord, list[list[dict]]] | None:
            with JobStore(self.fleet.db) as store:
                found = [(r, ranks) for r in self._computing(records) if (ranks := job_ranks(store, r.id))]
            return self.rng.choice(found) if found else None

        picked = self._pick(placed)
        if picked is None:
            return None
        target, ranks = picked
        # One of the job's own nodes; its replicas wholly elsewhere go on without it.
        node_of = {rank["node_id"] for replica in ranks for rank in replica}
        doomed = self.rng.choice(sorted(node_of))
        survivors = sum(all(rank["node_id"] != doomed for rank in replica) for replica in ranks)
        at, wall = self._at(), time.time()
        removed = self.ray.swap(doomed)
        if removed is not None:
            self.watch.add("node_swap", target.id, wall, wall, target.attempts)
        ended = self._attempt_ended(target.id, time.time() - 5, 60)
        return {"at_s": at, "job": target.id, "hit": removed is not None, "removed_node": removed,
                "replicas_left_elsewhere": survivors, "outcome": ended}


class RayNodes:
    """A local Ray cluster (`ray.cluster_utils.Cluster`): a head without GPUs and nodes that declare two each."""

    def __init__(self, nodes: int = 3) -> None:
        from ray.cluster_utils import Cluster

        self.tmpdir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
        os.environ.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=self.tmpdir)
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "num_gpus": 0, "include_dashboard": False,
            "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                               "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}})
        self.nodes = [self.cluster.add_node(num_cpus=1, num_gpus=2) for _ in range(nodes)]
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    def swap(self, node_id: str) -> str | None:
        """Remove the node `node_id` (SIGKILL, no grace) and add a fresh one; None if it is gone already."""
        node = next((n for n in self.nodes if n.node_id == node_id), None)
        if node is None:
            return None
        lose_node(self.cluster, node)  # its actors die with it, as on a lost machine
        self.nodes.remove(node)
        self.nodes.append(self.cluster.add_node(num_cpus=1, num_gpus=2))
        return node.node_id

    def shutdown(self) -> None:
        self.cluster.shutdown()


def _environment(folder: Path, sizes: Path, fault: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "EVALFLEET_CACHE": str(folder / "cache.sqlite"),
           "EVALFLEET_SIZES": str(sizes), "EVALFLEET_CALIBRATION": str(folder / "calibration.sqlite")}
    path = os.pathsep.join(p for p in (str(TESTS / "faults"), os.environ.get("PYTHONPATH", "")) if p)
    env.update(EVALFLEET_TEST_FAULT=fault, PYTHONPATH=path)
    return env


def _settle(fleet: Fleet, jobs: dict[str, str], deadline_s: float) -> tuple[dict[str, JobRecord], float]:
    """Wait until every job has ended or the deadline passed; returns the records and the time taken."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        records = fleet.records()
        if all(job in records and records[job].state.terminal for job in jobs.values()):
            break
        if fleet.process.poll() is not None:  # a scheduler that died on its own is a finding, not restarted
            break
        time.sleep(0.25)
    return fleet.records(), time.monotonic() - start


def _quarantined(fleet: Fleet) -> list:
    done = fleet.cli("pool", "--json")
    return json.loads(done.stdout).get("quarantined", []) if done.returncode == 0 else [f"pool failed: {done.stderr}"]


def run_phase(folder: Path, specs: list[JobSpec], models: dict[str, Path], sizes: Path,
              pool_args: tuple[str, ...], faults: list[str] | None, rng: random.Random, deadline_s: float,
              slow_s: float, ray: RayNodes | None = None, pause: tuple[float, float] = (0.5, 2.0)) -> dict:
    folder.mkdir(parents=True)
    trigger = folder / "oom-now"  # never made in the reference run, which is slowed alike
    fleet = Fleet(folder, _environment(folder, sizes, f"chaos:{slow_s}:{trigger}"), pool_args)
    disk = ResultsDisk(folder / "results") if faults else None
    injected: list[dict] = []
    recoveries: list[dict] = []
    watch = None
    try:
        fleet.start()
        t0 = time.monotonic()
        jobs = {spec.name: fleet.submit(spec, models) for spec in specs}
        if faults:
            watch = RecoveryWatch(fleet.db, CONFIRM_S["ray" if ray else "local"])
            time.sleep(rng.uniform(*pause))
            injected = Chaos(fleet, disk, trigger, rng, t0, watch, ray).soak(faults, pause, deadline_s)
        records, _ = _settle(fleet, jobs, deadline_s)
        wall = time.monotonic() - t0
        if watch is not None:
            recoveries = watch.report(timeout_s=5.0)
        documents = {}
        for spec_name, job in jobs.items():
            record = records.get(job)
            if record and record.result_path and Path(record.result_path).exists():
                documents[spec_name] = json.loads(Path(record.result_path).read_text())
        quarantined = _quarantined(fleet)
        statuses = {name: json.loads(fleet.cli("status", job, "--json").stdout) for name, job in jobs.items()
                    if job in records}
        scheduler_alive = fleet.process.poll() is None
    finally:
        if watch is not None:
            watch.close()
        fleet.stop()
        if disk is not None:
            disk.unmount()
    outcome = {}
    for spec_name, job in jobs.items():
        record = records.get(job)
        if record is None:
            status = "lost"
        elif record.state.terminal:
            status = record.state.value
        else:
            status = "hung" if _alive(record.pid) else "lost"
        launched = statuses.get(spec_name, {})
        outcome[spec_name] = {"id": job, "status": status, "attempts": launched.get("attempts"),
                              "failed_attempts": launched.get("failures"),
                              "error": record.error if record and status != "succeeded" else None}
    return {"wall_s": round(wall, 1), "jobs": outcome, "documents": documents, "faults": injected,
            "recoveries": recoveries,
            "quarantined": quarantined, "scheduler_alive_at_end": scheduler_alive,
            "disk_method": disk.method if disk else None, "mount_error": disk.mount_error if disk else None}


def _count_sizes(specs: list[JobSpec], models: dict[str, Path], folder: Path, sizes: Path) -> None:
    """Count each job's size once (kept under EVALFLEET_SIZES), so neither run's submits spend time on it."""
    folder.mkdir(parents=True)
    env = _environment(folder, sizes, "")
    for spec in specs:
        subprocess.run([sys.executable, "-m", "evalfleet.cli", "submit", *spec.submit_args(models),
                        "--db", str(folder / "jobs.db")],
                       capture_output=True, text=True, env=env, timeout=300)


def run(seed: int, jobs: int, faults: list[str], short: bool, ray: bool, deadline_s: float, work: Path,
        slow_s: float) -> dict:
    rng = random.Random(seed)
    specs = job_mix(jobs, short, rng)
    models = build_models(work / "models")
    sizes = work / "job-sizes"
    cluster = RayNodes() if ray else None
    try:
        pool_args = ("--ray", cluster.address) if cluster else ("--slots", "2")
        _count_sizes(specs, models, work / "count", sizes)
        reference = run_phase(work / "reference", specs, models, sizes, pool_args, None, rng,
                              deadline_s, slow_s)
        order = list(faults)
        rng.shuffle(order)
        chaos = run_phase(work / "chaos", specs, models, sizes, pool_args, order, rng, deadline_s,
                          slow_s, ray=cluster, pause=(0.5, 2.0) if short else (1.0, 5.0))
    finally:
        if cluster is not None:
            cluster.shutdown()
    per_job, counts = {}, {"succeeded": 0, "failed": 0, "lost": 0, "hung": 0, "cancelled": 0}
    for spec in specs:
        mine, theirs = chaos["jobs"][spec.name], reference["jobs"][spec.name]
        counts[mine["status"]] = counts.get(mine["status"], 0) + 1
        differences = None
        if spec.name in chaos["documents"] and spec.name in reference["documents"]:
            differences = metric_differences(reference["documents"][spec.name], chaos["documents"][spec.name])
        cache = chaos["documents"].get(spec.name, {}).get("evalfleet", {}).get("cache", {})
        startup = {phase: run_["documents"].get(spec.name, {}).get("evalfleet", {}).get("timing", {})
                   .get("split", {}).get("startup_seconds") for phase, run_ in (("reference", reference),
                                                                                ("final_attempt", chaos))}
        per_job[spec.name] = {
            "model": spec.model, "tasks": spec.tasks, "limit": spec.limit, "priority": spec.priority,
            "data_parallel": "--strategy" in spec.extra, "status": mine["status"], "attempts": mine["attempts"],
            "failed_attempts": mine["failed_attempts"],
            "reference_status": theirs["status"], "metrics_equal": differences == [],
            "metric_differences": differences, "final_attempt_cache": {k: cache.get(k) for k in ("hits", "computed")},
            "startup_s": startup,
            "error": mine["error"],
        }
    by_kind: dict[str, dict] = {}
    for entry in chaos["faults"]:
        row = by_kind.setdefault(entry["kind"], {"injected": 0, "hit": 0, "at_s": []})
        row["injected"] += 1
        row["hit"] += bool(entry["hit"])
        if "at_s" in entry:
            row["at_s"].append(entry["at_s"])
    ok = (counts["succeeded"] == len(specs) and all(job["metrics_equal"] for job in per_job.values())
          and not chaos["quarantined"] and not reference["quarantined"]
          and all(job["status"] == "succeeded" for job in reference["jobs"].values()))
    return {
        "benchmark": "chaos", "seed": seed, "short": short, "ray": ray, "slow_batch_s": slow_s,
        "pool": "ray cluster: head + 3 nodes x 2 declared GPUs" if ray else "2 CPU slots (local executor)",
        "jobs": len(specs), "job_specs": [spec.__dict__ | {"extra": list(spec.extra)} for spec in specs],
        "faults_injected": by_kind, "fault_log": chaos["faults"],
        "recovery_by_kind": recovery_summary(chaos["recoveries"]), "recoveries": chaos["recoveries"],
        "recovery_note": "seconds from the fault (its end, for the held lock and the full disk) to the job's next "
                         "completed batch as its worker recorded it; 'finished' where the retry found every "
                         "request cached",
        "disk_full_method": chaos["disk_method"], "mount_error": chaos["mount_error"],
        **{f"jobs_{k}": v for k, v in counts.items()},
        "attempts_per_job": {name: job["attempts"] for name, job in per_job.items()},
        "batches_recomputed": None,
        "batches_recomputed_note": "not recorded by the fleet; final_attempt_cache per job says what the last "
                                   "attempt found in the request cache and what it computed",
        "devices_quarantined": len(chaos["quarantined"]), "quarantined": chaos["quarantined"],
        "metrics_equal_to_reference": {name: job["metrics_equal"] for name, job in per_job.items()},
        "wall_s_without_faults": reference["wall_s"], "wall_s_with_faults": chaos["wall_s"],
        "scheduler_alive_at_end": chaos["scheduler_alive_at_end"],
        "per_job": per_job, "ok": ok,
    }


def _fault_list(text: str | None, short: bool, ray: bool) -> list[str]:
    if text:
        kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    else:
        local = [kind for kind in LOCAL_FAULTS if not (ray and kind in RANK_FAULTS)]  # Ray's ranks are actors
        # Two lost nodes on Ray, each one of a computing job's own nodes (the log says whether replicas were left).
        kinds = local * (1 if short else 2) + (["node_swap"] * 2 if ray else [])
    unknown = sorted(set(kinds) - set(LOCAL_FAULTS) - {"node_swap"})
    if unknown:
        known = ", ".join((*LOCAL_FAULTS, "node_swap"))
        raise SystemExit(f"unknown fault kind(s): {', '.join(unknown)}; known: {known}")
    return kinds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=6, help="jobs in the mix (ignored with --short: 3)")
    parser.add_argument("--faults", help=f"comma-separated kinds, repeats allowed (default: each of "
                                         f"{', '.join(LOCAL_FAULTS)} once with --short, else twice; on Ray "
                                         f"node_swap instead of the rank faults)")
    parser.add_argument("--short", action="store_true", help="3 small jobs, each local fault once (the test suite's)")
    parser.add_argument("--ray", action="store_true", help="run the jobs on a local Ray cluster; add node_swap")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds a run may take before a job counts as hung")
    parser.add_argument("--slow-batch", type=float, default=1.0,
                        help="seconds added to every rank batch in both runs: windows for the faults to land in")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    faults = _fault_list(args.faults, args.short, args.ray)
    deadline = args.deadline or (600.0 if args.short else 1800.0)
    with tempfile.TemporaryDirectory(prefix="chaos-") as scratch:
        work = args.work or Path(scratch)
        document = run(args.seed, args.jobs, faults, args.short, args.ray, deadline, work, args.slow_batch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps({k: v for k, v in document.items() if k not in ("per_job", "job_specs", "fault_log", "recoveries")}, indent=2))
    return 0 if document["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
