"""`evalfleet compare A B`: runs named by job id or results.json path, shown as a table or JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from evalfleet.orchestrator.store import resolve_db_path
from evalfleet.service.compare import Comparison, Run, compare_runs, load_results
from evalfleet.service.fleet import Fleet, NotFound
from evalfleet.types import EvalfleetError, UsageError

SIGNIFICANCE = 0.05


def resolve_run(name: str, db: str | None) -> Run:
    """A results.json (or its folder) if `name` is a path, else a job id in the store."""
    if Path(name).expanduser().exists():
        return load_results(name)
    db_path = resolve_db_path(db)
    if not db_path.exists():
        raise UsageError(f"{name} is neither a results file nor a job id (there is no job store at {db_path})")
    try:
        return Fleet(db_path).run(name)
    except NotFound:
        raise UsageError(f"{name} is neither a results file nor a job id in {db_path}") from None


def compare_command(a: str, b: str, *, db: str | None = None, as_json: bool = False,
                    console: Console | None = None) -> Comparison:
    comparison = compare_runs(resolve_run(a, db), resolve_run(b, db))
    if not comparison.compared:
        raise EvalfleetError("nothing to compare: " + "; ".join(t.refused or "" for t in comparison.tasks))
    if as_json:
        sys.stdout.write(json.dumps(comparison.to_dict(), indent=2) + "\n")
        return comparison
    if console is None:
        console = Console()
        if not console.is_terminal:
            console.width = 160  # pipes and logs: rows that do not wrap
    console.print(f"A = {comparison.a}\nB = {comparison.b}", highlight=False)
    table = Table()
    for column in ("task", "metric", "A", "B", "A - B", "test", "p-value", "flipped"):
        table.add_column(column, justify="right" if column in ("A", "B", "A - B", "p-value", "flipped") else "left")
    for task in comparison.compared:
        for number, m in enumerate(task.metrics):
            metric = m.metric if m.filter == "none" else f"{m.metric} ({m.filter})"
            p_value = "" if m.p_value is None else f"{m.p_value:.3g}" + (" *" if m.p_value < SIGNIFICANCE else "")
            table.add_row(task.task if number == 0 else "", metric, _number(m.a), _number(m.b),
                          "" if m.difference is None else f"{m.difference:+.4f}", m.test or (m.note or ""),
                          p_value, str(m.flipped_count) if m.test == "mcnemar" else "")
    console.print(table)
    console.print(f"* p < {SIGNIFICANCE}")
    for difference in comparison.settings:
        console.print(f"[yellow]settings differ[/yellow] {difference.setting}: A {_setting(difference.a)}, "
                      f"B {_setting(difference.b)}", highlight=False)
    for task in comparison.tasks:
        if task.refused:
            console.print(f"[red]not compared[/red] {task.refused}")
        for m in task.metrics:
            if m.flipped:
                shown = ", ".join(f"{f['doc_id']} ({f['a']:g}->{f['b']:g})" for f in m.flipped[:20])
                more = f" and {m.flipped_count - 20} more" if m.flipped_count > 20 else ""
                console.print(f"{task.task} {m.metric}: flipped samples {shown}{more}")
    return comparison


def _setting(value: object) -> str:
    text = "unset" if value is None else json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
