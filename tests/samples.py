"""Comparing per-sample results of two runs, number by number, with the project's tolerance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def within(a: float, b: float, abs_tol: float = 1e-4, rel_tol: float = 1e-5) -> bool:
    return abs(a - b) <= abs_tol + rel_tol * abs(b)


def load_samples(folder: Path) -> dict[str, list[dict[str, Any]]]:
    return {
        path.stem.removeprefix("samples_"): [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted(Path(folder).glob("samples_*.jsonl"))
    }


def _responses(sample: dict[str, Any]) -> list[Any]:
    return [resp[0] if isinstance(resp, list) and len(resp) == 1 else resp for resp in sample["resps"]]


def compare_samples(
    expected: dict[str, list[dict[str, Any]]], actual: dict[str, list[dict[str, Any]]], abs_tol=1e-4, rel_tol=1e-5
) -> list[str]:
    """Every difference between two runs' samples, as readable lines (empty when they agree)."""
    problems = []
    if set(expected) != set(actual):
        return [f"tasks differ: {sorted(expected)} vs {sorted(actual)}"]
    for task, rows in expected.items():
        mine = {row["doc_id"]: row for row in actual[task]}
        if len(mine) != len(rows):
            problems.append(f"{task}: {len(rows)} samples vs {len(mine)}")
        for row in rows:
            other = mine.get(row["doc_id"])
            if other is None:
                problems.append(f"{task}#{row['doc_id']}: missing")
                continue
            for a, b in zip(_responses(row), _responses(other), strict=True):
                if isinstance(a, str) or isinstance(b, str):
                    if a != b:
                        problems.append(f"{task}#{row['doc_id']}: generated {a!r} vs {b!r}")
                elif isinstance(a, list):
                    if not within(a[0], b[0], abs_tol, rel_tol) or bool(a[1]) != bool(b[1]):
                        problems.append(f"{task}#{row['doc_id']}: loglikelihood {a} vs {b}")
                elif not within(a, b, abs_tol, rel_tol):
                    problems.append(f"{task}#{row['doc_id']}: rolling loglikelihood {a} vs {b}")
    return problems


def metrics_of(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Metric values per task, without aliases, names and standard errors."""
    return {
        task: {k: v for k, v in values.items() if "," in k and "_stderr" not in k}
        for task, values in results["results"].items()
    }


def metric_differences(expected: dict[str, Any], actual: dict[str, Any], rel_tol: float = 1e-6) -> list[str]:
    """Metrics that differ between two results documents.

    Counts and accuracies must match exactly; a perplexity built from log-likelihoods that
    agree to the per-sample tolerance may move in its 7th significant digit, no more.
    """
    import math

    problems = []
    left, right = metrics_of(expected), metrics_of(actual)
    if left.keys() != right.keys():
        return [f"tasks differ: {sorted(left)} vs {sorted(right)}"]
    for task, metrics in left.items():
        if metrics.keys() != right[task].keys():
            problems.append(f"{task}: metrics {sorted(metrics)} vs {sorted(right[task])}")
            continue
        for name, value in metrics.items():
            other = right[task][name]
            is_ratio = "perplexity" in name or "bits_per_byte" in name
            same = math.isclose(value, other, rel_tol=rel_tol) if is_ratio else value == other
            if not same:
                problems.append(f"{task} {name}: {value} vs {other}")
    return problems


def lm_eval_hf(model: Path, tasks: list[str], limit: int, batch_size: int = 4) -> dict[str, Any]:
    """lm-eval's HFLM on a float32 model, in this (the main) environment: the reference (as JSON)."""
    from lm_eval import simple_evaluate

    from evalfleet.engines.evaluation import BOOTSTRAP_ITERS
    from evalfleet.tasks import build_task_manager

    out = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model), "dtype": "float32"},
        tasks=tasks,
        task_manager=build_task_manager(tasks),
        batch_size=batch_size,
        device="cpu",
        limit=limit,
        log_samples=True,
        bootstrap_iters=BOOTSTRAP_ITERS,
    )
    return json.loads(json.dumps(out, default=str))
