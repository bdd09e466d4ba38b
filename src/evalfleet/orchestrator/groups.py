"""Groups of jobs submitted as one (a sweep, a checkpoint watch): which of their cells are already
covered, and what `status GROUP` and `cancel GROUP` show and do.

A group's cell is skipped when the store holds a job with the same score-changing settings that
either has results or is still on its way to them: what a re-submitted sweep, or a watcher that
sees the same checkpoint twice, must not compute again. Settings that change only how or where the
work runs (engine, layout, batch sizes, priority, output and cache paths, keeping samples) are left
out of the comparison, since scores do not depend on them (docs/architecture.md, "Things that must
stay true").
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console

from evalfleet.orchestrator.console import (
    _console,
    _progress_by_job,
    cancel_job,
    job_document,
    jobs_table,
    launches,
    open_store,
)
from evalfleet.orchestrator.console import status_command as job_status_command
from evalfleet.orchestrator.scheduler import DistributedEvaluationOrchestrator, TaskProgress
from evalfleet.orchestrator.states import JobState
from evalfleet.orchestrator.store import GroupRecord, JobRecord, JobStore
from evalfleet.planning import Inventory
from evalfleet.types import EvalfleetError, EvaluationRequest, UsageError, resolve_model_path

# A job in one of these states has results, or will have them without being submitted again.
COVERED = (JobState.SUCCEEDED, JobState.QUEUED, JobState.PLACED, JobState.RUNNING, JobState.PREEMPTED)


def model_identity(path: str) -> str:
    """The model a path names: `demo` and `~` expanded, an existing folder resolved (links followed)."""
    expanded = Path(resolve_model_path(path))
    return str(expanded.resolve()) if expanded.exists() else str(expanded)


def score_key(request: EvaluationRequest) -> dict[str, Any]:
    """Every setting of `request` that can change a score, in a form two equal requests share."""
    model = request.model.model_dump(mode="json", exclude={"trust_remote_code"})
    harness = request.harness.model_dump(mode="json", exclude={"confirm_run_unsafe_code", "fewshot_as_multiturn"})
    include_path = request.tasks.include_path
    return {
        "model": {**model, "path": model_identity(request.model.path)},
        "tasks": sorted(set(request.tasks.names)),
        "include_path": str(Path(include_path).expanduser().resolve()) if include_path else None,
        "limit": request.tasks.limit,
        "num_fewshot": request.tasks.num_fewshot,
        "backend": request.backend,
        "harness": {**harness, "multiturn": request.harness.multiturn},
        "seed": list(request.seed),
    }


def key_text(request: EvaluationRequest) -> str:
    """`score_key` as one comparable string."""
    return json.dumps(score_key(request), sort_keys=True)


def covering_jobs(store: JobStore) -> dict[str, JobRecord]:
    """Per `key_text`, the job that covers it: a succeeded one before a live one, then the newest."""
    covering: dict[str, JobRecord] = {}
    ranked = sorted(store.list(COVERED), key=lambda r: (r.state is JobState.SUCCEEDED, r.submitted_at))
    for record in ranked:  # later (better) ones overwrite
        try:
            covering[key_text(EvaluationRequest.model_validate(record.request))] = record
        except ValidationError:  # stored by an older evalfleet in a form this one no longer reads
            continue
    return covering


def covering_job(store: JobStore, request: EvaluationRequest) -> JobRecord | None:
    """A job with `request`'s score-changing settings that succeeded or is queued or running; None if none."""
    return covering_jobs(store).get(key_text(request))


# status and cancel of a whole group ---------------------------------------------------------


def find_group(store: JobStore, group_id: str) -> GroupRecord | None:
    """The group with this id, or None where it names none (a job id, say)."""
    try:
        return store.group(group_id)
    except UsageError:
        return None


def group_summary(records: list[JobRecord]) -> dict[str, Any]:
    """How many jobs, by state, and their requests done of those counted."""
    by_state = Counter(record.state.value for record in records)
    return {"jobs": len(records), "by_state": dict(sorted(by_state.items())),
            "done": sum(record.done for record in records),
            "total": sum(record.total or 0 for record in records),
            "finished": all(record.state.terminal for record in records)}


def describe_summary(summary: dict[str, Any]) -> str:
    """`8 jobs: 6 succeeded, 2 running; 40/52 requests`."""
    states = ", ".join(f"{n} {state}" for state, n in summary["by_state"].items()) or "none"
    requests = f"; {summary['done']}/{summary['total']} requests" if summary["total"] else ""
    return f"{summary['jobs']} job{'s' if summary['jobs'] != 1 else ''}: {states}{requests}"


def varying_settings(records: list[JobRecord]) -> dict[str, dict[str, Any]]:
    """Per job, the score-changing settings (besides model and tasks) that differ between the jobs:
    what tells a sweep's cells apart (`num_fewshot: 1`, `harness.apply_chat_template: true`)."""
    flat = {}
    for record in records:
        try:
            key = score_key(EvaluationRequest.model_validate(record.request))
        except ValidationError:
            key = {}
        flat[record.id] = {name: value for name, value in _flatten(key).items() if name not in ("model.path", "tasks")}
    names = {name for settings in flat.values() for name in settings}
    varying = sorted(name for name in names if len({json.dumps(s.get(name)) for s in flat.values()}) > 1)
    return {job: {name: settings.get(name) for name in varying} for job, settings in flat.items()}


def _flatten(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, item in value.items():
        if isinstance(item, dict) and item:
            flat.update(_flatten(item, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = item
    return flat


def group_document(store: JobStore, group: GroupRecord, progress: dict[str, TaskProgress]) -> dict[str, Any]:
    """A group as JSON: what made it, its jobs (as `status JOB --json` shows each, with the settings that
    tell them apart) and a summary."""
    records = store.jobs_in_group(group.id)
    settings = varying_settings(records)
    return {"id": group.id, "kind": group.kind, "name": group.name, "created_at": group.created_at,
            "spec": group.spec, "summary": group_summary(records),
            "jobs": [{**job_document(record, store, progress.get(record.id)), "settings": settings[record.id]}
                     for record in records]}


def group_status_command(store: JobStore, group: GroupRecord, as_json: bool, console: Console) -> None:
    """`evalfleet status GROUP`: the group's jobs as one table, then a summary line."""
    progress = _progress_by_job(store)
    if as_json:
        sys.stdout.write(json.dumps(group_document(store, group, progress), indent=2) + "\n")
        return
    records = store.jobs_in_group(group.id)
    title = " ".join(filter(None, (group.kind, group.name, f"(group {group.id})")))
    notes = {job: ", ".join(f"{name}={json.dumps(value)}" for name, value in settings.items())
             for job, settings in varying_settings(records).items()}
    console.print(jobs_table(records, progress, launches(store), time.time(), title, notes=notes))
    console.print(describe_summary(group_summary(records)))


def cancel_group(store: JobStore, group_id: str) -> list[str]:
    """Cancel every unfinished job of the group; returns their ids. A group with none left is refused."""
    store.group(group_id)  # an unknown id is refused
    orchestrator = DistributedEvaluationOrchestrator(store, Inventory([]))
    cancelled = []
    for record in store.jobs_in_group(group_id):
        if record.state.terminal:
            continue
        try:
            orchestrator.cancel(record.id)
        except EvalfleetError:  # it finished meanwhile
            continue
        cancelled.append(record.id)
    if not cancelled:
        summary = describe_summary(group_summary(store.jobs_in_group(group_id)))
        raise NothingToCancel(f"group {group_id} has no unfinished job ({summary})")
    return cancelled


class NothingToCancel(UsageError):
    """Every job of the group has finished already."""


def status_command(target: str | None, db: str | None, as_json: bool) -> None:
    """`evalfleet status [JOB|GROUP]`: a group id shows its jobs; anything else is the job status it was."""
    if target is not None:
        with open_store(db) as store:
            group = find_group(store, target)
            if group is not None:
                group_status_command(store, group, as_json, _console())
                return
    job_status_command(target, db, as_json)


def cancel_command(target: str, db: str | None) -> str:
    """`evalfleet cancel JOB|GROUP`: the line it prints."""
    with open_store(db) as store:
        if find_group(store, target) is None:
            return f"job {cancel_job(target, db).id} cancelled"
        cancelled = cancel_group(store, target)
        summary = describe_summary(group_summary(store.jobs_in_group(target)))
    return f"group {target}: {len(cancelled)} job{'s' if len(cancelled) != 1 else ''} cancelled; {summary}"
