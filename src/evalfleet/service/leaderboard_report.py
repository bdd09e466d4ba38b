"""`evalfleet leaderboard`: the runs it ranks (a group, named models, jobs or results folders, or every
finished job) and the leaderboard as a table, Markdown, CSV, JSON or a self-contained HTML page (with
the score-by-step charts of a group of checkpoints)."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from evalfleet.orchestrator.states import JobState
from evalfleet.orchestrator.store import JobRecord, JobStore, resolve_db_path
from evalfleet.service.compare import load_results
from evalfleet.service.leaderboard import Cell, Entry, Leaderboard, Section, build
from evalfleet.types import UsageError, resolve_model_path

FORMATS = ("table", "md", "csv", "json", "html")
CSV_FIELDS = ("section", "model", "step", "task", "metric", "filter", "value", "stderr", "best", "difference",
              "test", "p_value", "verdict", "source")


def job_entry(record: JobRecord) -> Entry | None:
    """A succeeded job's results as an entry (None for a job with none to read)."""
    if record.state is not JobState.SUCCEEDED or not record.result_path:
        return None
    try:
        run = load_results(record.result_path, label=record.id)
    except UsageError:
        return None
    return Entry(record.request["model"]["path"], run, record.finished_at or record.submitted_at, record.id)


def folder_entry(path: str) -> Entry:
    """A results.json (or its folder) written by `evalfleet run` or by lm-eval itself."""
    run = load_results(path)
    document = run.document
    model = ((document.get("evalfleet") or {}).get("model") or {}).get("path") or document.get("model_name")
    finished = document.get("date") if isinstance(document.get("date"), (int, float)) else None
    return Entry(model or run.folder.name, run, finished or (run.folder / "results.json").stat().st_mtime)


def store_entries(store: JobStore, *, group: str | None = None, models: Sequence[str] = ()) -> list[Entry]:
    """The runs to rank: a group's finished jobs, or each named job, results folder or model's finished jobs,
    or every finished job in the store."""
    if group is not None:
        entries = [e for e in map(job_entry, store.jobs_in_group(store.group(group).id)) if e is not None]
        if not entries:
            raise UsageError(f"group {group} has no succeeded job with results yet")
        return entries
    finished = [e for e in map(job_entry, store.list([JobState.SUCCEEDED])) if e is not None]
    if not models:
        return finished
    entries: list[Entry] = []
    for name in models:
        entries.extend(_named(name, store, finished))
    return entries


def _named(name: str, store: JobStore, finished: list[Entry]) -> list[Entry]:
    by_job = [e for e in finished if e.job == name]
    if by_job:
        return by_job
    path = resolve_model_path(name)
    wanted = {path, str(Path(path).expanduser().resolve())}
    by_model = [e for e in finished if e.model in wanted or Path(e.model).name == name]
    if by_model:
        return by_model
    if (Path(path).expanduser() / "results.json").is_file() or Path(path).expanduser().suffix == ".json":
        return [folder_entry(path)]
    raise UsageError(f"{name} is neither a finished job, a model with finished jobs, nor a results file in {store.path}")


def leaderboard_command(*, group: str | None, models: Sequence[str], baseline: str | None, alpha: float,
                        output_format: str, output: str | None, db: str | None,
                        lm_eval_layout: str | None = None) -> Leaderboard:
    if output_format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not '{output_format}'")
    if not 0 < alpha < 1:
        raise UsageError(f"--alpha must be between 0 and 1, not {alpha}")
    if group is not None and models:
        raise UsageError("give either --group or --models, not both")
    db_path = resolve_db_path(db)
    if not db_path.exists() and (group is not None or not models):
        raise UsageError(f"there is no job store at {db_path}")
    with JobStore(db_path) as store:
        entries = store_entries(store, group=group, models=models)
    if not entries:
        raise UsageError(f"there is no succeeded job with results in {db_path} yet")
    board = build(entries, baseline=baseline, alpha=alpha)
    text = render_html(board, group or "") if output_format == "html" else render(board, output_format)
    if output is None:
        print(text, end="")
    else:
        Path(output).expanduser().write_text(text)
    if lm_eval_layout is not None:
        from evalfleet.service.lm_eval_layout import export_runs

        ranked = {source for section in board.sections for row in section.rows for source in row.sources}
        written = export_runs([e for e in entries if e.source in ranked], Path(lm_eval_layout).expanduser())
        print(f"{len(written)} run(s) written in lm-eval's layout under {lm_eval_layout}", file=sys.stderr)
    return board


def render_html(board: Leaderboard, title: str) -> str:
    """One self-contained page (the dashboard's tables and score-by-step charts, its style inlined, no
    links), to open in a browser or attach to a report."""
    import datetime

    import jinja2

    from evalfleet import __version__
    from evalfleet.service.leaderboard_chart import step_charts

    here = Path(__file__).parent
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(here / "templates"), autoescape=True)
    return env.get_template("leaderboard_page.html").render(
        board=board, charts=[step_charts(section) for section in board.sections], title=title,
        css=(here / "static" / "style.css").read_text(), version=__version__,
        written=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"))


def render(board: Leaderboard, output_format: str) -> str:
    if output_format == "json":
        return json.dumps(board.to_dict(), indent=2) + "\n"
    if output_format == "csv":
        return to_csv(board)
    if output_format == "md":
        return to_markdown(board)
    console = Console(file=io.StringIO(), width=200, force_terminal=False)
    for number, section in enumerate(board.sections, 1):
        table = Table(title=_title(section, number), title_justify="left")
        for heading in _headings(section):
            table.add_column(heading, justify="left" if heading in ("model", "step") else "right")
        for row in section.rows:
            table.add_row(*_row_texts(section, row, lambda cell: cell_text(cell) + (" *" if cell.best else "")))
        console.print(table)
    console.print(_legend(board))
    return console.file.getvalue()


def cell_text(cell: Cell | None) -> str:
    """'0.7500 ± 0.0100', with the verdict against the baseline ('+', '-' or '≈') after it."""
    if cell is None:
        return ""
    text = f"{cell.value:.4f}" + ("" if cell.stderr is None else f" ± {cell.stderr:.4f}")
    return text + (f" {cell.verdict}" if cell.verdict else "")


def _headings(section: Section) -> list[str]:
    first = ["step", "model"] if section.checkpoints else ["model"]
    return [*first, *(f"{c.task} ({c.metric})" for c in section.columns), "mean"]


def _row_texts(section: Section, row, shown) -> list[str]:
    first = [str(row.step), row.label] if section.checkpoints else [row.label + (" (baseline)" if row.baseline else "")]
    cells = [row.cells.get(c.name) for c in section.columns] + [row.mean]
    return [*first, *("" if cell is None else shown(cell) for cell in cells)]


def _title(section: Section, number: int) -> str:
    lines = [f"Section {number}" + (f": {section.reason}" if section.reason else "")]
    if section.note:
        lines.append(section.note)
    return "\n".join(lines)


def _legend(board: Leaderboard) -> str:
    text = "* best in its column; mean over the tasks where higher is better"
    if board.baseline:
        text += (f"; against {board.baseline}: + or - significant at alpha {board.alpha:g} (compare's paired test), "
                 "≈ not significant")
    return text


def to_markdown(board: Leaderboard) -> str:
    parts = []
    for number, section in enumerate(board.sections, 1):
        parts.append(f"## {_title(section, number)}\n")
        headings = _headings(section)
        parts.append("| " + " | ".join(headings) + " |")
        parts.append("|" + "|".join("---" if h in ("model", "step") else "---:" for h in headings) + "|")
        for row in section.rows:
            texts = _row_texts(section, row, lambda cell: f"**{cell_text(cell)}**" if cell.best else cell_text(cell))
            parts.append("| " + " | ".join(texts) + " |")
        parts.append("")
    parts.append(_legend(board).replace("* best", "**bold**: best") + "\n")
    return "\n".join(parts)


def to_csv(board: Leaderboard) -> str:
    """One line per cell (and per row's mean), every number at full precision."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for number, section in enumerate(board.sections, 1):
        for row in section.rows:
            cells = [(c.task, c.metric, c.filter, row.cells.get(c.name)) for c in section.columns]
            for task, metric, filter_name, cell in [*cells, ("mean", "", "", row.mean)]:
                if cell is not None:
                    writer.writerow({"section": number, "model": row.model, "step": row.step, "task": task,
                                     "metric": metric, "filter": filter_name, "value": repr(cell.value),
                                     "stderr": _full(cell.stderr), "best": cell.best,
                                     "difference": _full(cell.difference), "test": cell.test or "",
                                     "p_value": _full(cell.p_value), "verdict": cell.verdict or "",
                                     "source": cell.source or ""})
    return buffer.getvalue()


def _full(value: float | None) -> str:
    return "" if value is None else repr(value)

