"""What `evalfleet submit`, `status`, `queue` and `cancel` do and show.

These commands talk to the store only, never to the scheduler process: the store is the
source of truth, so they work whether or not a scheduler runs, and a cancel reaches the
scheduler that owns the job on its next round.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from evalfleet.orchestrator.demand import JobDemand
from evalfleet.orchestrator.policy import PolicyOptions, QueuedJob, queue_order
from evalfleet.orchestrator.pool import recorded_pool, submission_pool
from evalfleet.orchestrator.pool_status import describe_ranks, job_ranks
from evalfleet.orchestrator.recovery import RecoveryOptions
from evalfleet.orchestrator.scheduler import DistributedEvaluationOrchestrator, TaskProgress
from evalfleet.orchestrator.states import JobState
from evalfleet.orchestrator.store import JobRecord, JobStore, resolve_db_path
from evalfleet.types import EvaluationRequest

_STATE_STYLE = {
    JobState.QUEUED: "cyan", JobState.PLACED: "yellow", JobState.RUNNING: "bold yellow",
    JobState.PREEMPTED: "magenta", JobState.SUCCEEDED: "green", JobState.FAILED: "bold red",
    JobState.CANCELLED: "dim",
}


def _console() -> Console:
    """A terminal's own width; elsewhere (pipes, logs) wide enough that rows do not wrap."""
    console = Console()
    if not console.is_terminal:
        console.width = 160
    return console


def open_store(db: str | None) -> JobStore:
    return JobStore(resolve_db_path(db))


def _absolute(path: str | None) -> str | None:
    """A path the worker finds from its own working folder (the scheduler's, not the submitter's)."""
    if path is None or not Path(path).expanduser().exists():
        return path
    return str(Path(path).expanduser().resolve())


def submit_job(request: EvaluationRequest, db: str | None = None, pool: str | None = None, *,
               group_id: str | None = None) -> str:
    """Queue `request` (in `group_id`'s group); refuse it (EvalfleetError) if it can never fit the pool."""
    request = request.model_copy(update={
        "model": request.model.model_copy(update={"path": _absolute(request.model.path)}),
        "tasks": request.tasks.model_copy(update={"include_path": _absolute(request.tasks.include_path)}),
        "cache_path": str(Path(request.cache_path).expanduser().resolve()) if request.cache_path else None,
        "output_dir": str(Path(request.output_dir).expanduser().resolve()) if request.output_dir else None,
    })
    with open_store(db) as store:
        recorded = recorded_pool(store) or {}
        recovery = RecoveryOptions(max_attempts=recorded.get("max_attempts", RecoveryOptions.max_attempts))
        orchestrator = DistributedEvaluationOrchestrator(store, submission_pool(store, pool), recovery=recovery)
        return orchestrator.submit_evaluation_request(request, group_id=group_id)


def submitted_size(job_id: str, db: str | None = None) -> tuple[str, str]:
    """The job's size and its compute estimate, as `submit` prints them."""
    with open_store(db) as store:
        record = store.get(job_id)
        return describe_size(record.size), describe_estimate(job_estimate_document(record))


def cancel_job(job_id: str, db: str | None = None) -> JobRecord:
    with open_store(db) as store:
        return DistributedEvaluationOrchestrator(store, submission_pool(store)).cancel(job_id)


# documents ----------------------------------------------------------------------------------


def job_document(record: JobRecord, store: JobStore, progress: TaskProgress | None = None) -> dict[str, Any]:
    """One job as JSON: `attempts` counts launches; `failures` the attempts that failed."""
    events = store.events(record.id)
    fraction = record.done / record.total if record.total else None
    return {
        "id": record.id,
        "state": record.state.value,
        "priority": record.priority,
        "attempts": sum(1 for e in events if e.to_state is JobState.PLACED),
        "failures": record.attempts,
        "max_attempts": record.max_attempts,
        "model": record.request["model"]["path"],
        "tasks": record.request["tasks"]["names"],
        "limit": record.request["tasks"].get("limit"),
        "group": record.group_id,
        "progress": {
            "done": record.done, "total": record.total,
            "fraction": round(fraction, 4) if fraction is not None else None,
            "tokens_per_s": record.tokens_per_s, "requests_per_s": record.requests_per_s,
            "eta_s": round(progress.eta_s, 1) if progress and progress.eta_s is not None else None,
        },
        "size": record.size,
        "estimate": job_estimate_document(record),
        "width": job_width(record),
        "devices": [list(d) for d in record.placement or ()],
        "ranks": job_ranks(store, record.id),
        "pid": record.pid,
        "submitted_at": record.submitted_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "retry_at": record.not_before if record.state is JobState.QUEUED and record.not_before else None,
        "result_path": record.result_path,
        "error": record.error,
        "events": [{"at": e.at, "from": e.from_state.value if e.from_state else None, "to": e.to_state.value,
                    "attempt": e.attempt, "reason": e.reason} for e in events],
    }


def job_width(record: JobRecord) -> dict[str, Any] | None:
    """Its replicas now, the fewest and most it may have, and whether they can change while it runs."""
    if not record.demand:
        return None
    size = record.demand["tp"] * record.demand["pp"]
    replicas = len(record.placement or ()) // size if record.state in (JobState.PLACED, JobState.RUNNING) else 0
    resize = record.resize or {}
    return {"replicas": replicas, "fewest": record.demand["min_replicas"], "most": len(record.demand["tokens_per_s"]),
            "live": record.resize is not None, "joining": len(resize.get("joining", []) + resize.get("grow", [])),
            "leaving": len(resize.get("leaving", []) + resize.get("shrink", []))}


def _progress_by_job(store: JobStore) -> dict[str, TaskProgress]:
    orchestrator = DistributedEvaluationOrchestrator(store, submission_pool(store))
    return {task.job_id: task for task in orchestrator.monitor_running_tasks()}


def queued_in_order(store: JobStore, now: float) -> list[JobRecord]:
    """Queued jobs in the order the policy considers them (priority with aging, then age)."""
    records = {r.id: r for r in store.list([JobState.QUEUED]) if r.demand is not None}
    jobs = [QueuedJob(r.id, JobDemand.from_dict(r.demand), r.priority, r.submitted_at, r.not_before)
            for r in records.values()]
    return [records[job.id] for job in queue_order(jobs, now, PolicyOptions.aging_s)]


# rendering ----------------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _bar(record: JobRecord) -> Any:
    if not record.total:
        return Text("")
    return ProgressBar(total=record.total, completed=min(record.done, record.total), width=10)


def launches(store: JobStore) -> Counter[str]:
    """How many times each job was started (placed), retries and resumptions included."""
    return Counter(event.job_id for event in store.events() if event.to_state is JobState.PLACED)


def jobs_table(records: list[JobRecord], progress: dict[str, TaskProgress], started: Counter[str], now: float,
               title: str, numbered: bool = False, notes: dict[str, str] | None = None) -> Table:
    """One row per job; narrow enough for 100 columns, the job id never cut. `notes` go after a job's
    model and tasks (a group's jobs: the settings that tell them apart)."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    columns = ["#"] if numbered else []
    columns += ["job", "state", "prio", "progress", "requests", "tok/s", "ETA", "try", "model/tasks"]
    for column in columns:
        table.add_column(column, justify="right" if column in ("requests", "tok/s", "ETA", "#") else "left",
                         no_wrap=column != "model/tasks", overflow="fold")
    for position, record in enumerate(records, 1):
        task = progress.get(record.id)
        state = Text(record.state.value, style=_STATE_STYLE[record.state])
        if record.state is JobState.QUEUED and record.not_before > now:
            state.append(f" (retry in {_duration(record.not_before - now)})", style="dim")
        what = f"{Path(record.request['model']['path']).name}/{','.join(record.request['tasks']['names'])}"
        if notes and notes.get(record.id):
            what += f" ({notes[record.id]})"
        counts = f"{record.done}/{record.total}" if record.total else ""
        speed = f"{record.tokens_per_s:,.0f}" if record.tokens_per_s and record.state is JobState.RUNNING else ""
        row = [str(position)] if numbered else []
        row += [record.id, state, record.priority, _bar(record), counts, speed,
                _duration(task.eta_s if task else None), f"{started[record.id]}/{record.max_attempts}", what]
        table.add_row(*row)
    return table


def status_command(job_id: str | None, db: str | None, as_json: bool, console: Console | None = None) -> None:
    console = console or _console()
    with open_store(db) as store:
        now = time.time()
        progress = _progress_by_job(store)
        if job_id is not None:
            record = store.get(job_id)
            document = job_document(record, store, progress.get(job_id))
            if as_json:
                sys.stdout.write(json.dumps(document, indent=2) + "\n")
            else:
                _render_job(document, console)
            return
        records = store.list()
        if as_json:
            sys.stdout.write(json.dumps([job_document(r, store, progress.get(r.id)) for r in records], indent=2) + "\n")
            return
        pool = recorded_pool(store)
        if not records:
            console.print(f"no jobs in {store.path}")
            return
        title = "jobs" + (f" on {pool['description']}" if pool else "")
        table = jobs_table(records, progress, launches(store), now, title)
        table.caption = f"store: {store.path}"
        console.print(table)


def queue_command(db: str | None, console: Console | None = None) -> None:
    """Running jobs with their progress, then the queue in the order it will start."""
    console = console or _console()
    with open_store(db) as store:
        now = time.time()
        progress = _progress_by_job(store)
        active = store.list([JobState.RUNNING, JobState.PLACED, JobState.PREEMPTED])
        waiting = queued_in_order(store, now)
        if not active and not waiting:
            console.print(f"the queue is empty ({store.path})")
            return
        started = launches(store)
        if active:
            console.print(jobs_table(active, progress, started, now, "running"))
        if waiting:
            console.print(jobs_table(waiting, progress, started, now, "queued, in start order", numbered=True))


def job_estimate_document(record: JobRecord) -> dict[str, Any] | None:
    """The compute time estimated at submit (measured or modeled speeds, `calibration.py`), and
    for a finished job the compute time its results.json measured, with the ratio of predicted
    to measured for the tokens its last attempt computed (a resumed job computes only the rest)."""
    estimate = (record.plan or {}).get("estimate")
    if not estimate:
        return None
    document = dict(estimate)
    if record.state is JobState.SUCCEEDED and record.result_path:
        try:
            timing = json.loads(Path(record.result_path).read_text())["evalfleet"]["timing"]
        except (OSError, ValueError, KeyError):
            return document
        computed = timing.get("by_kind") or {}
        measured = sum(kind["seconds"] for kind in computed.values())
        speeds = estimate.get("by_kind") or {}
        if measured > 0 and all(kind in speeds for kind in computed):
            predicted = sum(kind["tokens"] / speeds[name]["tokens_per_s"] for name, kind in computed.items())
            document["measured_seconds"] = round(measured, 3)
            document["predicted_over_measured"] = round(predicted / measured, 3)
    return document


def describe_estimate(estimate: dict[str, Any] | None) -> str:
    """`12.3 s of compute (measured speeds); the cost model says 20.1 s; the run computed for 11.8 s,
    predicted/measured 1.04`."""
    if not estimate:
        return ""
    text = f"{estimate['seconds']:,.1f} s of compute ({estimate['source']} speeds)"
    if estimate["source"] != "modeled":
        text += f"; the cost model says {estimate['modeled_seconds']:,.1f} s"
    if "measured_seconds" in estimate:
        text += (f"; the run computed for {estimate['measured_seconds']:,.1f} s, predicted/measured "
                 f"{estimate['predicted_over_measured']:.2f}")
    return text


def describe_size(size: dict[str, Any] | None) -> str:
    """`1,480 requests (…), 23,482 tokens, counted`, or the modeled figure and why it is not counted."""
    if not size:
        return ""
    if size.get("source") != "counted":
        return f"{size['work_tokens']:,.0f} tokens, modeled ({size.get('reason', 'not counted')})"
    kinds = ", ".join(f"{kind} {n:,}" for kind, n in size["requests_by_type"].items())
    return (f"{size['requests']:,} requests ({kinds}), {size['work_tokens']:,} tokens "
            f"({size['generation_tokens']:,} of them a generation budget), counted")


def describe_width(width: dict[str, Any] | None) -> str:
    """`2 now (1 to 2, resized while it runs; 1 leaving)`, `1 to 2` for a job holding none (queued or
    ended); nothing for a job that can use one replica only."""
    if not width or width["most"] == 1:
        return ""
    live = ", resized while it runs" if width["live"] else ""
    moving = "; ".join(f"{width[k]} {k}" for k in ("joining", "leaving") if width[k])
    span = f"{width['fewest']} to {width['most']}{live}{'; ' + moving if moving else ''}"
    return f"{width['replicas']} now ({span})" if width["replicas"] else span  # none held: queued or ended


def _render_job(document: dict[str, Any], console: Console) -> None:
    table = Table(title=f"job {document['id']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    progress = document["progress"]
    rows = {
        "state": document["state"], "priority": document["priority"],
        "model": document["model"], "tasks": ", ".join(document["tasks"]),
        "attempts": f"{document['attempts']} started, {document['failures']} failed "
                    f"(at most {document['max_attempts']})",
        "size": describe_size(document["size"]),
        "estimate": describe_estimate(document.get("estimate")),
        "progress": f"{progress['done']}/{progress['total']} requests" if progress["total"] else "",
        "tokens/s": f"{progress['tokens_per_s']:,.0f}" if progress["tokens_per_s"] else "",
        "ETA": _duration(progress["eta_s"]),
        "devices": ", ".join(f"node {n} device {g}" for n, g in document["devices"]),
        "replicas": describe_width(document.get("width")),
        "ranks": describe_ranks(document["ranks"]),
        "result": document["result_path"] or "", "error": document["error"] or "",
    }
    for key, value in rows.items():
        if value:
            table.add_row(key, value)
    console.print(table)
    history = Table(title="history")
    for column in ("time", "from", "to", "attempt", "reason"):
        history.add_column(column)
    for event in document["events"]:
        history.add_row(time.strftime("%H:%M:%S", time.localtime(event["at"])), event["from"] or "", event["to"],
                        str(event["attempt"]), event["reason"] or "")
    console.print(history)

