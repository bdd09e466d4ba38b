"""Sweeps and groups over HTTP: `POST /api/v1/sweeps`, `GET /api/v1/groups[/{id}]`, `POST /api/v1/groups/{id}/cancel`.

A sweep's body is the sweep file as JSON, read by the command's own model (`sweeps.SweepSpec`).
Every cell is admitted as `POST /api/v1/jobs` admits a job (model roots, task policy, nothing that
runs code on the server) before any is submitted. A model glob is confined as a model path is:
absolute, no `..`, and its folder before the first wildcard strictly under a model root (checked
before anything is listed); each match is then resolved and checked as a model path.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field

from evalfleet.orchestrator.sweeps import GLOB_CHARACTERS, Cell, SweepSpec, expand_models, matrix
from evalfleet.service.fleet import Fleet
from evalfleet.service.schemas import Job
from evalfleet.service.security import Forbidden, ModelRoots, resolve_under
from evalfleet.types import UsageError

GroupId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class SweepCell(BaseModel):
    model: str
    tasks: list[str]
    setting: int
    options: dict[str, Any]
    job: str | None = None
    covered_by: str | None = None
    state: str | None = None


class SweepSubmitted(BaseModel):
    group: str | None
    submitted: list[SweepCell]
    skipped: list[SweepCell]


class GroupSummary(BaseModel):
    jobs: int
    by_state: dict[str, int]
    done: int
    total: int
    finished: bool


class Group(BaseModel):
    id: str
    kind: str
    name: str | None
    created_at: float
    summary: GroupSummary


class GroupJob(Job):
    settings: dict[str, Any] = Field(description="its score-changing settings that differ from the group's other jobs'")


class GroupDetail(Group):
    spec: dict[str, Any]
    jobs: list[GroupJob]


def add_routes(router: APIRouter) -> None:
    router.add_api_route("/sweeps", submit_sweep, methods=["POST"], status_code=201, response_model=SweepSubmitted)
    router.add_api_route("/groups", list_groups, methods=["GET"], response_model=list[Group])
    router.add_api_route("/groups/{group_id}", get_group, methods=["GET"], response_model=GroupDetail)
    router.add_api_route("/groups/{group_id}/cancel", cancel_group, methods=["POST"], response_model=GroupDetail)


def _fleet(request: Request) -> Fleet:
    return request.app.state.fleet


def submit_sweep(body: SweepSpec, request: Request) -> dict[str, Any]:
    """Submit models × task sets × settings as one group; cells already covered are skipped."""
    if any(setting.confirm_run_unsafe_code for setting in body.settings):
        raise UsageError("tasks that execute the model's code cannot be confirmed over HTTP; "
                         "submit them on the server with evalfleet sweep")
    roots: ModelRoots = request.app.state.model_roots
    cells = matrix(body, expand_models(body.models, lambda pattern: confine_pattern(pattern, roots)))
    admitted = [_admit(request, cell) for cell in cells]  # all of them before any is submitted
    return _fleet(request).submit_sweep(body, admitted).document()


def _admit(request: Request, cell: Cell) -> Cell:
    evaluation = request.app.state.model_roots.admit(cell.request)
    return replace(cell, request=request.app.state.task_policy.admit(evaluation, None))


def confine_pattern(pattern: str, roots: ModelRoots) -> None:
    """Refuse a model glob that could list anything outside the model roots (Forbidden)."""
    given = FilePath(pattern)
    if ".." in given.parts:
        raise Forbidden(f"the model pattern {pattern} contains '..'; give it as an absolute path under a model root")
    if not given.is_absolute():
        raise Forbidden(f"the model pattern {pattern} is not an absolute path; give it as one under a model root")
    literal = FilePath(*itertools.takewhile(lambda part: not GLOB_CHARACTERS.search(part), given.parts))
    resolve_under(str(literal), roots.roots, f"model pattern {pattern}, whose folder", "model")


def list_groups(request: Request) -> list[dict[str, Any]]:
    """Every group (sweeps, checkpoint watches), newest first, with its jobs counted by state."""
    return _fleet(request).groups()


def get_group(group_id: GroupId, request: Request) -> dict[str, Any]:
    """A group, what made it, and its jobs."""
    return _fleet(request).group(group_id)


def cancel_group(group_id: GroupId, request: Request) -> dict[str, Any]:
    """Cancel every unfinished job of the group; running ones are stopped by the scheduler on its next round."""
    return _fleet(request).cancel_group(group_id)
