"""How a run shows its progress: a rich bar on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

PHASE_NAMES = {
    "loglikelihood": "log-likelihood",
    "loglikelihood_rolling": "rolling log-likelihood",
    "generate_until": "generation",
}


class RunProgress:
    """A progress callback for `EvalfleetLM`: requests done/total, tokens/s and ETA."""

    def __init__(self, console: Console | None = None, interval: float = 5.0) -> None:
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.interval = interval
        self._progress: Progress | None = None
        self._tasks: dict[str, Any] = {}
        self._started = time.perf_counter()
        self._last_line = 0.0

    def __enter__(self) -> RunProgress:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, phase: str, done: int, total: int, tokens: int) -> None:
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        rate = f"{tokens / elapsed:,.0f} tok/s"
        name = PHASE_NAMES.get(phase, phase)
        if self._progress is not None:
            task = self._tasks.get(phase)
            if task is None:
                task = self._tasks[phase] = self._progress.add_task(name, total=total, rate=rate)
            self._progress.update(task, completed=done, total=total, rate=rate)
            return
        now = time.perf_counter()
        if done in (0, total) or now - self._last_line >= self.interval:
            self._last_line = now
            print(f"[evalfleet] {name}: {done}/{total} requests, {rate}", file=sys.stderr, flush=True)


def results_table(document: dict[str, Any]) -> Table:
    """Task × metric table from lm-eval's results document."""
    table = Table(title="evalfleet results")
    for column in ("task", "n-shot", "metric", "value", "stderr"):
        table.add_column(column, justify="right" if column in ("value", "stderr") else "left")
    n_shot = document.get("n-shot", {})
    for task, metrics in sorted(document.get("results", {}).items()):
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, int | float):
                continue
            metric, _, filter_name = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            stderr_text = f"{stderr:.4f}" if isinstance(stderr, int | float) else ""
            label = metric if filter_name in ("", "none") else f"{metric} ({filter_name})"
            table.add_row(task, str(n_shot.get(task, "")), label, f"{value:.4f}", stderr_text)
    return table
