"""A leaderboard of finished runs: models (rows) × tasks (columns), each cell a score ± its stderr.

Pure functions over `Entry`s (a run's results and where they came from); no store, no web.

- **One row per model and settings.** The same model evaluated again with the same settings
  merges into its row: each task's cell comes from the newest run that has it.
- **Never ranked together silently.** Runs whose score-changing settings differ (lm-eval's
  version, backend, dtype, model arguments, chat template, few-shot, generation settings, seeds,
  and per task: n-shot, version, task hash, sample count) go to separate sections, each saying
  in one line how it differs from the first.
- **Checkpoints of one run** (every row's model folder names a step, all in one parent folder)
  are ordered by step; other rows by their mean.
- **Baseline.** Each cell is tested against the baseline's cell of the same column with the very
  function `evalfleet compare` uses (`compare_runs`), so the p-values are the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evalfleet.orchestrator.checkpoints import checkpoint_step
from evalfleet.service.compare import MetricComparison, Run, _metric_keys, compare_runs, score_settings
from evalfleet.types import UsageError

ALPHA = 0.05
NOT_SIGNIFICANT = "≈"


@dataclass(frozen=True)
class Entry:
    """One finished run as the leaderboard reads it."""

    model: str
    """The model's identity: its resolved path (or the name it was given)."""
    run: Run
    finished_at: float
    job: str | None = None

    @property
    def source(self) -> str:
        return self.job or str(self.run.folder)


@dataclass
class Column:
    name: str
    task: str
    metric: str
    filter: str
    higher_is_better: bool


@dataclass
class Cell:
    value: float
    stderr: float | None
    source: str | None = None
    """The job id (or results folder) the value comes from; None for the mean."""
    best: bool = False
    difference: float | None = None
    """This cell minus the baseline's, with a baseline."""
    test: str | None = None
    p_value: float | None = None
    verdict: str | None = None
    """'+' or '-' (significantly above or below the baseline), '≈' (not significant), None (no test)."""
    note: str | None = None


@dataclass
class Row:
    model: str
    label: str
    step: int | None
    cells: dict[str, Cell] = field(default_factory=dict)
    mean: Cell | None = None
    baseline: bool = False
    sources: list[str] = field(default_factory=list)


@dataclass
class Section:
    columns: list[Column]
    rows: list[Row]
    settings: dict[str, Any]
    reason: str | None = None
    """Why these rows are not ranked with the first section's (None for the first)."""
    checkpoints: bool = False
    note: str | None = None


@dataclass
class Leaderboard:
    sections: list[Section]
    baseline: str | None = None
    alpha: float = ALPHA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _normal(value: Any) -> Any:
    """Unset, false and empty are one value, as `compare` counts them."""
    return None if value is None or value is False or value == {} or value == [] else value


def run_settings(document: dict[str, Any]) -> dict[str, Any]:
    """Every run-wide setting that can change a score: compare's list, plus the backend and dtype."""
    evalfleet = document.get("evalfleet") or {}
    settings = {"backend": (evalfleet.get("backend") or {}).get("name"),
                "dtype": (evalfleet.get("model") or {}).get("dtype")}
    settings.update(score_settings(document))
    return {key: _normal(value) for key, value in settings.items()}


def task_settings(document: dict[str, Any], task: str) -> dict[str, Any]:
    """Per task: what lm-eval says decides its prompts and its sample set."""
    return {"n-shot": document.get("n-shot", {}).get(task), "version": document.get("versions", {}).get(task),
            "task hash": (document.get("task_hashes") or {}).get(task) or None,
            "samples": document.get("n-samples", {}).get(task, {}).get("effective")}


def _differences(a: Entry, b: Entry) -> list[str]:
    """How b's settings differ from a's; empty when their scores may be ranked together."""
    left, right = run_settings(a.run.document), run_settings(b.run.document)
    found = [f"{key} {_shown(right.get(key))} ({_shown(left.get(key))} there)"
             for key in sorted(set(left) | set(right)) if left.get(key) != right.get(key)]
    for task in (t for t in a.run.document["results"] if t in b.run.document["results"]):
        mine, theirs = task_settings(a.run.document, task), task_settings(b.run.document, task)
        for key in mine:
            if mine[key] is not None and theirs[key] is not None and mine[key] != theirs[key]:
                found.append(f"{task} {key} {_shown(theirs[key])} ({_shown(mine[key])} there)")
    return found


def _shown(value: Any) -> str:
    text = "unset" if value is None else str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def build(entries: Sequence[Entry], *, baseline: str | None = None, alpha: float = ALPHA) -> Leaderboard:
    """The leaderboard of `entries`: sections of comparable runs, rows ranked, best marked, tested."""
    groups: list[list[Entry]] = []
    for entry in sorted(entries, key=lambda e: e.finished_at, reverse=True):
        home = next((g for g in groups if not any(_differences(other, entry) for other in g)), None)
        if home is None:
            groups.append(home := [])
        home.append(entry)
    groups.sort(key=lambda g: len({e.model for e in g}), reverse=True)  # the most models first, then the newest
    sections = [_section(group) for group in groups]
    for section, group in zip(sections[1:], groups[1:]):
        differences = next(found for other in groups[0] if (found := _differences(other, group[0])))
        section.reason = "not ranked with section 1, whose settings differ: " + "; ".join(differences)
    board = Leaderboard(sections, baseline, alpha)
    if baseline is not None:
        _test_against(board, groups, baseline, alpha)
    return board


def _section(group: list[Entry]) -> Section:
    """Rows (newest run first per task), columns, means, ranking and best cells of one comparable group."""
    rows: dict[str, Row] = {}
    columns: dict[str, Column] = {}
    for entry in group:  # newest first: the first value of a (model, task) wins
        document = entry.run.document
        row = rows.setdefault(entry.model, Row(entry.model, _label(entry.model), checkpoint_step(entry.model)))
        for task, metrics in document["results"].items():
            column = columns.get(task)
            if column is None:
                keys = _metric_keys(metrics)  # the task's main metric: the first lm-eval reports
                if not keys:
                    continue
                metric, filter_name = keys[0]
                better = document.get("higher_is_better", {}).get(task, {}).get(metric, True)
                column = columns[task] = Column(task, task, metric, filter_name, better is not False)
            value = metrics.get(f"{column.metric},{column.filter}")
            if task in row.cells or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{column.metric}_stderr,{column.filter}")
            row.cells[task] = Cell(float(value), float(stderr) if isinstance(stderr, (int, float)) else None, entry.source)
            if entry.source not in row.sources:
                row.sources.append(entry.source)
    ordered = [columns[name] for name in sorted(columns)]
    for row in rows.values():
        row.mean = _mean(row, ordered)
    folders = {str(Path(row.model).parent) for row in rows.values()}
    checkpoints = len(folders) == 1 and all(row.step is not None for row in rows.values())
    if checkpoints:
        ranked = sorted(rows.values(), key=lambda r: r.step)
    else:
        ranked = sorted(rows.values(), key=lambda r: (r.mean is None, -(r.mean.value if r.mean else 0.0), r.label))
    _mark_best(ranked, ordered)
    return Section(ordered, ranked, run_settings(group[0].run.document), checkpoints=checkpoints)


def _label(model: str) -> str:
    path = Path(model)
    return path.name if path.is_absolute() and path.name else model


def _mean(row: Row, columns: list[Column]) -> Cell | None:
    """The mean over the tasks where higher is better; only for a row that has them all."""
    averaged = [c.name for c in columns if c.higher_is_better]
    if not averaged or any(name not in row.cells for name in averaged):
        return None
    cells = [row.cells[name] for name in averaged]
    errors = [c.stderr for c in cells]
    stderr = math.sqrt(sum(e * e for e in errors)) / len(cells) if None not in errors else None
    return Cell(sum(c.value for c in cells) / len(cells), stderr)


def _mark_best(rows: list[Row], columns: list[Column]) -> None:
    """The best cell of each column (ties all), unless every cell ties: then none stands out."""
    for column in [*columns, None]:
        cells = [row.mean if column is None else row.cells.get(column.name) for row in rows]
        cells = [cell for cell in cells if cell is not None]
        best = (max if column is None or column.higher_is_better else min)((c.value for c in cells), default=None)
        if any(cell.value != best for cell in cells):
            for cell in cells:
                cell.best = cell.value == best


def _test_against(board: Leaderboard, groups: list[list[Entry]], baseline: str, alpha: float) -> None:
    """Each cell against the baseline's cell of its column, with `compare`'s paired test."""
    found = False
    for section, group in zip(board.sections, groups):
        runs = {entry.source: entry.run for entry in group}
        base = next((row for row in section.rows if baseline in (row.model, row.label) or baseline in row.sources), None)
        if base is None:
            section.note = f"the baseline {baseline} is not in this section (its settings differ), so nothing here is tested"
            continue
        found = base.baseline = True
        comparisons: dict[tuple[str, str], Any] = {}
        for row in section.rows:
            for column in section.columns:
                cell, reference = row.cells.get(column.name), base.cells.get(column.name)
                if row is base or cell is None or reference is None:
                    continue
                pair = (cell.source, reference.source)
                if pair not in comparisons:
                    comparisons[pair] = compare_runs(runs[cell.source], runs[reference.source])
                _verdict(cell, _metric(comparisons[pair], column), alpha)
    if not found:
        raise UsageError(f"the baseline {baseline} is none of the leaderboard's models")


def _metric(comparison: Any, column: Column) -> MetricComparison | None:
    for task in comparison.tasks:
        if task.task == column.task:
            if task.refused:
                return MetricComparison(column.metric, column.filter, None, None, None, note=task.refused)
            return next((m for m in task.metrics if (m.metric, m.filter) == (column.metric, column.filter)), None)
    return None


def _verdict(cell: Cell, tested: MetricComparison | None, alpha: float) -> None:
    if tested is None:
        cell.note = "not tested"
        return
    cell.difference, cell.test, cell.p_value, cell.note = tested.difference, tested.test, tested.p_value, tested.note
    if tested.p_value is not None and tested.difference is not None:
        significant = tested.p_value < alpha and tested.difference != 0
        cell.verdict = ("+" if tested.difference > 0 else "-") if significant else NOT_SIGNIFICANT
