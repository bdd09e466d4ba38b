"""Finished runs rewritten in lm-eval's own output layout, by lm-eval's own `EvaluationTracker`.

A run's folder holds `results.json` and `samples_<task>.jsonl` (lm-eval's documents, file names of our
own); tools built for `lm_eval --output_path DIR` read `DIR/<model>/results_<time>.json` and
`DIR/<model>/samples_<task>_<time>.jsonl`, which is what this writes, one pair of files per run.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

from evalfleet.service.leaderboard import Entry
from evalfleet.types import EvalfleetError


def export_runs(entries: Sequence[Entry], folder: Path) -> list[Path]:
    """Each run's results and samples under `folder`, as lm-eval writes them; returns the results files."""
    from lm_eval.loggers import EvaluationTracker

    written = []
    for entry in entries:
        document = copy.deepcopy(entry.run.document)
        tasks = [task for task in document["results"] if entry.run.samples(task) is not None]
        samples = {task: sorted(entry.run.samples(task).values(), key=lambda row: row["doc_id"]) for task in tasks}
        tracker = EvaluationTracker(output_path=str(folder))
        tracker.general_config_tracker.log_experiment_args(
            model_source=((document.get("evalfleet") or {}).get("backend") or {}).get("name") or "hf",
            model_args={"pretrained": entry.model}, system_instruction=document.get("system_instruction"),
            chat_template=document.get("chat_template"), fewshot_as_multiturn=bool(document.get("fewshot_as_multiturn")))
        before = set(folder.glob("*/results_*.json"))
        _quietly(tracker.save_results_aggregated, results=document, samples=samples or None)
        (results,) = set(folder.glob("*/results_*.json")) - before or (None,)
        if results is None:
            raise EvalfleetError(f"lm-eval could not write {entry.source}'s results under {folder}")
        for task, rows in samples.items():
            _quietly(tracker.save_results_samples, task, rows)
        written.append(results)
    return written


def _quietly(function, *args, **kwargs) -> None:
    """lm-eval's tracker logs each file at INFO; the command prints its own one line."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        function(*args, **kwargs)
    finally:
        logger.setLevel(level)
