"""Finished jobs for the leaderboard tests, run once per session by the live service's scheduler.

- the demo model, 0-shot, and 1-shot (other settings: never ranked with the 0-shot run),
- a group of two checkpoints, `step-20/` and `step-100/` (step order is not name order), both copies of the tiny model (the same
  weights: their per-sample results agree, so a test between them is not significant).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from evalfleet.orchestrator import JobStore
from evalfleet.orchestrator.console import submit_job
from evalfleet.types import EvaluationRequest

TASKS = ["demo_mc", "demo_arith"]
LIMIT = 12


@dataclass(frozen=True)
class LeaderboardJobs:
    db: Path
    jobs: dict[str, str]
    """name -> job id: demo, demo-1shot, step-20, step-100."""
    group: str


def submit_leaderboard_jobs(live, tiny_model: Path, home: Path) -> LeaderboardJobs:
    for step in (20, 100):
        shutil.copytree(tiny_model, home / f"step-{step}")
    with JobStore(live.db) as store:
        group = store.create_group("sweep", "checkpoints", {})

    def submit(model: str, num_fewshot: int = 0, group_id: str | None = None) -> str:
        request = EvaluationRequest.model_validate({
            "model": {"path": model}, "log_samples": True,
            "tasks": {"names": TASKS, "limit": LIMIT, "num_fewshot": num_fewshot}})
        return submit_job(request, str(live.db), group_id=group_id)

    jobs = {"demo": submit("demo"), "step-100": submit(str(home / "step-100"), group_id=group),
            "step-20": submit(str(home / "step-20"), group_id=group), "demo-1shot": submit("demo", 1)}
    for job in jobs.values():
        live.wait_state(job, "succeeded")
    return LeaderboardJobs(live.db, jobs, group)
