"""Run-to-run comparison: per task and metric, both values, the difference, and a paired test.

Two runs are compared on a task only when lm-eval says they evaluated the same thing: the
same task hash (prompts, targets, config) and the same number of samples. The test pairs
the per-sample scores by `doc_id`: McNemar's exact test when every score is 0 or 1
(accuracy-like), otherwise a paired bootstrap of the task's own aggregation (so
perplexities are compared as perplexities, not as averages of per-sample pairs).

Settings that can change a score (chat template, system instruction, few-shot mode, generation
settings, seeds, model arguments, lm-eval's version) are set side by side, and every one the two
runs differ in is listed: a difference in scores may be theirs, not the model's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evalfleet.types import UsageError

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 1234
MAX_FLIPPED = 200
"""Flipped samples listed per metric; the count is always complete."""


@dataclass(frozen=True)
class Run:
    """One run as compared: its results document and the folder its samples files are in."""

    label: str
    document: dict[str, Any]
    folder: Path

    def samples(self, task: str) -> dict[int, dict[str, Any]] | None:
        path = self.folder / f"samples_{task}.jsonl"
        if not path.is_file():
            return None
        rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
        return {row["doc_id"]: row for row in rows}


def load_results(path: str | Path, label: str | None = None) -> Run:
    """A run from its results.json (or the folder holding it)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "results.json"
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no results file at {path}") from None
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read {path} as a results document: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("results"), dict):
        raise UsageError(f"{path} is not an lm-eval results document (it has no 'results' section)")
    return Run(label or str(path), document, path.parent)


@dataclass
class MetricComparison:
    metric: str
    filter: str
    a: float | None
    b: float | None
    difference: float | None
    test: str | None = None
    p_value: float | None = None
    note: str | None = None
    flipped_count: int = 0
    flipped: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TaskComparison:
    task: str
    samples: int | None
    metrics: list[MetricComparison] = field(default_factory=list)
    refused: str | None = None


@dataclass
class SettingDifference:
    setting: str
    a: Any
    b: Any


@dataclass
class Comparison:
    a: str
    b: str
    tasks: list[TaskComparison]
    settings: list[SettingDifference] = field(default_factory=list)

    @property
    def compared(self) -> list[TaskComparison]:
        return [task for task in self.tasks if task.refused is None]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided exact McNemar p-value: a binomial test on the discordant pairs."""
    only_a = sum(1 for x, y in zip(a, b) if x > y)
    only_b = sum(1 for x, y in zip(a, b) if y > x)
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap(a: Sequence[Any], b: Sequence[Any], aggregate: Callable[[list[Any]], float],
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> float:
    """Two-sided p-value of the aggregate's difference, resampling documents with replacement.

    The null distribution is the bootstrap distribution of the difference shifted to zero:
    p = share of resampled differences at least as far from the observed one as it is from 0.
    """
    observed = aggregate(list(a)) - aggregate(list(b))
    if observed == 0:
        return 1.0
    rng = np.random.default_rng(seed)
    n = len(a)
    draws = rng.integers(0, n, size=(resamples, n))
    if aggregate is _mean and all(isinstance(x, (int, float)) for x in (*a, *b)):
        deltas = np.asarray(a, float)[draws].mean(axis=1) - np.asarray(b, float)[draws].mean(axis=1)
    else:
        deltas = np.array([aggregate([a[i] for i in row]) - aggregate([b[i] for i in row]) for row in draws])
    extreme = int(np.sum(np.abs(deltas - observed) >= abs(observed)))
    return (extreme + 1) / (resamples + 1)


def _mean(values: list[Any]) -> float:
    return float(np.mean(values))


def _aggregation(document: dict[str, Any], task: str, metric: str) -> Callable[[list[Any]], float]:
    """The task's own aggregation of `metric` (from its config), as lm-eval would apply it."""
    name = "mean"
    for entry in document.get("configs", {}).get(task, {}).get("metric_list", []) or []:
        if entry.get("metric") == metric and isinstance(entry.get("aggregation"), str):
            name = entry["aggregation"]
    if name == "mean":
        return _mean
    from lm_eval.api.registry import get_aggregation

    function = get_aggregation(name)
    if function is None:
        raise UsageError(f"unknown aggregation '{name}' for {task}/{metric}")
    return lambda values: float(function(values))


def _is_binary(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (bool, int, float)) and float(v) in (0.0, 1.0) for v in values)


def _metric_keys(results: dict[str, Any]) -> list[tuple[str, str]]:
    keys = []
    for key, value in results.items():
        if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        metric, _, filter_name = key.partition(",")
        keys.append((metric, filter_name))
    return keys


def _refusal(task: str, a: Run, b: Run) -> str | None:
    hash_a, hash_b = (run.document.get("task_hashes", {}).get(task) for run in (a, b))
    if hash_a and hash_b and hash_a != hash_b:
        return f"{task}: the task hashes differ ({hash_a[:12]} vs {hash_b[:12]}), so the runs did not see the same prompts"
    count_a, count_b = (run.document.get("n-samples", {}).get(task, {}).get("effective") for run in (a, b))
    if count_a != count_b:
        return f"{task}: the sample counts differ ({count_a} vs {count_b})"
    return None


def _compare_metric(task: str, metric: str, filter_name: str, a: Run, b: Run,
                    samples: tuple[dict[int, dict], dict[int, dict]] | None) -> MetricComparison:
    key = f"{metric},{filter_name}"
    value_a, value_b = a.document["results"][task].get(key), b.document["results"][task].get(key)
    row = MetricComparison(metric, filter_name, value_a, value_b,
                           None if value_a is None or value_b is None else value_a - value_b)
    if samples is None:
        row.note = "no per-sample records in both runs (run with --log-samples)"
        return row
    rows_a, rows_b = samples
    doc_ids = sorted(doc_id for doc_id in rows_a if doc_id in rows_b
                     and rows_a[doc_id].get("filter", filter_name) == filter_name and metric in rows_a[doc_id]
                     and metric in rows_b[doc_id])
    if not doc_ids:
        row.note = "no paired per-sample scores for this metric"
        return row
    scores_a = [rows_a[d][metric] for d in doc_ids]
    scores_b = [rows_b[d][metric] for d in doc_ids]
    if _is_binary(scores_a) and _is_binary(scores_b):
        row.test, row.p_value = "mcnemar", mcnemar_exact(scores_a, scores_b)
        flipped = [{"doc_id": d, "a": float(x), "b": float(y)}
                   for d, x, y in zip(doc_ids, scores_a, scores_b) if float(x) != float(y)]
        row.flipped_count, row.flipped = len(flipped), flipped[:MAX_FLIPPED]
    else:
        aggregate = _aggregation(a.document, task, metric)
        row.test, row.p_value = "paired bootstrap", paired_bootstrap(scores_a, scores_b, aggregate)
    return row


def score_settings(document: dict[str, Any]) -> dict[str, Any]:
    """A run's score-changing settings, one level deep: evalfleet's record, else lm-eval's own fields."""
    recorded = (document.get("evalfleet") or {}).get("settings")
    if not isinstance(recorded, dict):
        config = document.get("config") or {}
        recorded = {key: document.get(key) for key in ("lm_eval_version", "chat_template_sha", "system_instruction_sha",
                                                         "fewshot_as_multiturn")}
        recorded["gen_kwargs"] = config.get("gen_kwargs")
        recorded["seeds"] = {name: config.get(f"{name}_seed") for name in ("random", "numpy", "torch", "fewshot")}
    flat: dict[str, Any] = {}
    for key, value in recorded.items():
        if key in ("seeds", "model_args") and isinstance(value, dict):
            flat.update({f"{key}.{name}": inner for name, inner in value.items()})
        else:
            flat[key] = value
    return flat


def _unset(value: Any) -> bool:
    return value is None or value is False or value == {} or value == []


def setting_differences(a: Run, b: Run) -> list[SettingDifference]:
    """The settings both runs record and differ in (unset, false and empty count as one)."""
    left, right = score_settings(a.document), score_settings(b.document)
    return [SettingDifference(key, left[key], right[key]) for key in left
            if key in right and left[key] != right[key] and not (_unset(left[key]) and _unset(right[key]))]


def compare_runs(a: Run, b: Run) -> Comparison:
    """Every task both runs evaluated, compared metric by metric (or refused, with the reason), and the
    score-changing settings they differ in."""
    tasks = [task for task in a.document["results"] if task in b.document["results"]]
    if not tasks:
        raise UsageError(f"{a.label} and {b.label} have no task in common")
    comparison = Comparison(a.label, b.label, [], setting_differences(a, b))
    for task in tasks:
        entry = TaskComparison(task, a.document.get("n-samples", {}).get(task, {}).get("effective"))
        comparison.tasks.append(entry)
        entry.refused = _refusal(task, a, b)
        if entry.refused:
            continue
        rows_a, rows_b = a.samples(task), b.samples(task)
        samples = (rows_a, rows_b) if rows_a is not None and rows_b is not None else None
        keys = [k for k in _metric_keys(a.document["results"][task]) if k in _metric_keys(b.document["results"][task])]
        entry.metrics = [_compare_metric(task, metric, filter_name, a, b, samples) for metric, filter_name in keys]
    return comparison
