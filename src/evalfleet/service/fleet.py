"""What the service reads from and does to the fleet: one place over the orchestrator's store.

The API and the dashboard both call these functions, so a page and its JSON twin never
disagree. Each of the web server's threads keeps one connection to the store (SQLite in WAL
mode, shared with the scheduler and its workers): reads never wait for another thread's
write, and no request pays for opening the store.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from evalfleet.orchestrator.console import job_document, submit_job
from evalfleet.orchestrator.groups import NothingToCancel, cancel_group, find_group, group_document, group_summary
from evalfleet.orchestrator.pool import inventory_from_dict, recorded_pool
from evalfleet.orchestrator.scheduler import DistributedEvaluationOrchestrator
from evalfleet.orchestrator.states import JobState
from evalfleet.orchestrator.store import JobRecord, JobStore
from evalfleet.orchestrator.sweeps import Cell, SweepOutcome, SweepSpec, submit_sweep
from evalfleet.planning import Inventory
from evalfleet.service.compare import Comparison, Run, compare_runs, load_results
from evalfleet.service.leaderboard import ALPHA, Leaderboard, build
from evalfleet.service.leaderboard_report import store_entries
from evalfleet.types import EvalfleetError, EvaluationRequest, UsageError


class NotFound(EvalfleetError):
    """A job, task or sample that does not exist (HTTP 404)."""


class Conflict(EvalfleetError):
    """A request the job's state does not allow now (HTTP 409)."""


class Fleet:
    """The job store at `db_path`, as the service sees it."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)
        self._local = threading.local()
        self.store()  # create (and migrate) it up front, so a bad path fails at start-up

    def store(self) -> JobStore:
        """This thread's connection (closed with the thread, when its local data goes)."""
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = JobStore(self.db_path)
        return store

    def record(self, store: JobStore, job_id: str) -> JobRecord:
        try:
            return store.get(job_id)
        except UsageError:
            raise NotFound(f"no job with id '{job_id}'") from None

    # jobs -------------------------------------------------------------------------------------

    def jobs(self, *, state: JobState | None = None, model: str | None = None, priority: str | None = None,
             offset: int = 0, limit: int = 50) -> tuple[int, list[dict[str, Any]]]:
        """Newest first, filtered; returns (how many match, this page)."""
        store = self.store()
        records = store.list([state] if state else None)
        records = [r for r in records if (model is None or model in r.request["model"]["path"])
                   and (priority is None or r.priority == priority)]
        records.reverse()
        progress = _progress_by_job(store)
        page = records[offset:offset + limit]
        return len(records), [job_document(r, store, progress.get(r.id)) for r in page]

    def job(self, job_id: str) -> dict[str, Any]:
        store = self.store()
        record = self.record(store, job_id)
        return job_document(record, store, _progress_by_job(store).get(job_id))

    def submit(self, request: EvaluationRequest) -> str:
        return submit_job(request, str(self.db_path))

    def cancel(self, job_id: str) -> dict[str, Any]:
        store = self.store()
        record = self.record(store, job_id)
        if record.state.terminal:
            raise Conflict(f"job {job_id} already {record.state.value}")
        DistributedEvaluationOrchestrator(store, Inventory([])).cancel(job_id)
        return job_document(store.get(job_id), store)

    def events_after(self, job_id: str, after: int) -> tuple[JobRecord, list[dict[str, Any]]]:
        """The job now and its state changes since event id `after` (for the event stream)."""
        store = self.store()
        record = self.record(store, job_id)
        events = [{"id": e.id, "at": e.at, "from": e.from_state.value if e.from_state else None,
                   "to": e.to_state.value, "attempt": e.attempt, "reason": e.reason}
                  for e in store.events(job_id, after=after)]
        return record, events

    # groups (sweeps, checkpoint watches) -------------------------------------------------------

    def submit_sweep(self, spec: SweepSpec, cells: list[Cell]) -> SweepOutcome:
        return submit_sweep(self.store(), spec, cells, origin={"via": "api"},
                            submit=lambda request, group: submit_job(request, str(self.db_path), group_id=group))

    def groups(self) -> list[dict[str, Any]]:
        """Newest first, each with its jobs counted by state."""
        store = self.store()
        return [{"id": g.id, "kind": g.kind, "name": g.name, "created_at": g.created_at,
                 "summary": group_summary(store.jobs_in_group(g.id))} for g in reversed(store.groups())]

    def group(self, group_id: str) -> dict[str, Any]:
        store = self.store()
        group = find_group(store, group_id)
        if group is None:
            raise NotFound(f"no group with id '{group_id}'")
        return group_document(store, group, _progress_by_job(store))

    def cancel_group(self, group_id: str) -> dict[str, Any]:
        self.group(group_id)  # a 404 for an unknown group
        try:
            cancel_group(self.store(), group_id)
        except NothingToCancel as error:
            raise Conflict(str(error)) from None
        return self.group(group_id)

    # results ----------------------------------------------------------------------------------

    def run(self, job_id: str) -> Run:
        """A succeeded job's results, for reading and comparing."""
        store = self.store()
        record = self.record(store, job_id)
        if record.state is not JobState.SUCCEEDED or not record.result_path:
            raise Conflict(f"job {job_id} has no results: it is {record.state.value}")
        return load_results(record.result_path, label=job_id)

    def results(self, job_id: str) -> dict[str, Any]:
        return self.run(job_id).document

    def _sample_rows(self, job_id: str, task: str) -> dict[int, dict[str, Any]]:
        run = self.run(job_id)
        if task not in run.document["results"]:
            raise NotFound(f"job {job_id} did not evaluate a task named '{task}'")
        rows = run.samples(task)
        if rows is None:
            raise NotFound(f"job {job_id} kept no per-sample records for {task} (submit it with log_samples)")
        return rows

    def samples(self, job_id: str, task: str, *, offset: int = 0, limit: int = 20) -> tuple[int, list[dict]]:
        """One page of a task's per-sample records, in document order; returns (total, page)."""
        rows = self._sample_rows(job_id, task)
        ordered = [rows[doc_id] for doc_id in sorted(rows)]
        return len(ordered), ordered[offset:offset + limit]

    def sample(self, job_id: str, task: str, doc_id: int) -> dict[str, Any]:
        row = self._sample_rows(job_id, task).get(doc_id)
        if row is None:
            raise NotFound(f"job {job_id} has no sample {doc_id} in {task}")
        return row

    def compare(self, a: str, b: str) -> Comparison:
        return compare_runs(self.run(a), self.run(b))

    def leaderboard(self, *, group: str | None = None, baseline: str | None = None, alpha: float = ALPHA) -> Leaderboard:
        """A group's (else every) succeeded job ranked; see `leaderboard.py`."""
        store = self.store()
        if group is not None and find_group(store, group) is None:
            raise NotFound(f"no group with id '{group}'")
        return build(store_entries(store, group=group), baseline=baseline, alpha=alpha)

    # the pool ---------------------------------------------------------------------------------

    def pool(self) -> dict[str, Any]:
        """Nodes and devices of the scheduler's pool, which job holds each, and quarantine.

        The one reader of the orchestrator's pool data: the scheduler's recorded pool, the
        running jobs' placements and the quarantine table.
        """
        store = self.store()
        recorded = recorded_pool(store)
        quarantined = store.quarantined()
        holders = {tuple(device): r.id for r in store.list([JobState.PLACED, JobState.RUNNING])
                   for device in r.placement or ()}
        if recorded is None:
            return {"scheduler": None, "description": None, "nodes": []}
        inventory = inventory_from_dict(recorded["inventory"])
        nodes = []
        for n, node in enumerate(inventory.nodes):
            devices = []
            for g, gpu in enumerate(node.gpus):
                job = holders.get((n, g))
                reason = quarantined.get((n, g))
                devices.append({"node": n, "index": g, "name": gpu.name, "memory_gb": round(gpu.total_gb, 2),
                                "job": job, "quarantined": reason,
                                "status": "quarantined" if reason else "busy" if job else "free"})
            nodes.append({"index": n, "name": node.name or f"node {n}", "interconnect": node.interconnect,
                          "devices": devices})
        return {"scheduler": {"pid": recorded.get("pid"), "started_at": recorded.get("started_at")},
                "description": recorded.get("description"), "nodes": nodes}

    def job_counts(self) -> dict[str, Any]:
        """Jobs by state, queue waits and running throughput, for the Prometheus page."""
        now = time.time()
        store = self.store()
        records = store.list()
        first_start = {}
        for event in store.events():
            if event.to_state is JobState.PLACED:
                first_start.setdefault(event.job_id, event.at)
        by_state = {state.value: 0 for state in JobState}
        for record in records:
            by_state[record.state.value] += 1
        waits = [first_start[r.id] - r.submitted_at for r in records if r.id in first_start]
        queued = [now - r.enqueued_at for r in records if r.state is JobState.QUEUED]
        running = {r.id: r.tokens_per_s or 0.0 for r in records if r.state is JobState.RUNNING}
        return {"by_state": by_state, "waits": waits, "oldest_queued_s": max(queued, default=0.0),
                "tokens_per_s": running}


def _progress_by_job(store: JobStore) -> dict[str, Any]:
    """ETAs of running jobs, as `evalfleet status` computes them (no pool needed for that)."""
    return {task.job_id: task for task in DistributedEvaluationOrchestrator(store, Inventory([])).monitor_running_tasks()}
