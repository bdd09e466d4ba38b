"""Results documents and samples files written by hand, for comparison tests with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path


def write_run(folder: Path, task: str, scores: list[float], *, metric: str = "acc", task_hash: str = "h1",
              extra_tasks: dict | None = None, samples: bool = True, aggregation: str = "mean") -> Path:
    """A run of one task whose per-sample `metric` scores are `scores` (doc ids 0..n-1)."""
    folder.mkdir(parents=True, exist_ok=True)
    if aggregation == "mean":
        value = sum(scores) / len(scores)
    else:
        value = math.exp(-sum(s[0] for s in scores) / sum(s[1] for s in scores))  # weighted_perplexity
    document = {
        "results": {task: {"alias": task, f"{metric},none": value, f"{metric}_stderr,none": 0.01},
                    **(extra_tasks or {})},
        "configs": {task: {"metric_list": [{"metric": metric, "aggregation": aggregation}]}},
        "n-samples": {task: {"original": len(scores), "effective": len(scores)}},
        "task_hashes": {task: task_hash},
        "evalfleet": {"engine": "lightweight"},
    }
    (folder / "results.json").write_text(json.dumps(document))
    if samples:
        with (folder / f"samples_{task}.jsonl").open("w") as handle:
            for doc_id, score in enumerate(scores):
                handle.write(json.dumps({"doc_id": doc_id, "filter": "none", "metrics": [metric],
                                         metric: score, "target": "x", "arguments": {}, "resps": []}) + "\n")
    return folder / "results.json"
