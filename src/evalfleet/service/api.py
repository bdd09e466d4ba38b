"""The REST API under /api/v1: jobs, their event stream, results, samples, the pool, comparison."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse

from evalfleet.orchestrator.states import JobState
from evalfleet.service import group_api
from evalfleet.service.compare import Comparison
from evalfleet.service.fleet import Fleet
from evalfleet.service.leaderboard import ALPHA, Leaderboard
from evalfleet.service.watches import Watch, list_watches
from evalfleet.service.schemas import (
    MAX_PAGE,
    MAX_SAMPLES_PAGE,
    Job,
    JobPage,
    JobSubmission,
    Pool,
    Problem,
    SamplePage,
    Submitted,
)
from evalfleet.types import EvaluationRequest, UsageError, describe_validation_error

JobId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
TaskName = Annotated[str, Path(min_length=1, max_length=256)]
_ERRORS = {status: {"model": Problem} for status in (400, 401, 403, 404, 409, 413, 422)}


def fleet(request: Request) -> Fleet:
    return request.app.state.fleet


FleetDep = Annotated[Fleet, Depends(fleet)]


def build_router(dependencies: list[Any]) -> APIRouter:
    router = APIRouter(prefix="/api/v1", dependencies=dependencies, responses=_ERRORS)
    router.add_api_route("/jobs", submit, methods=["POST"], status_code=201, response_model=Submitted)
    router.add_api_route("/jobs", list_jobs, methods=["GET"], response_model=JobPage)
    router.add_api_route("/jobs/{job_id}", get_job, methods=["GET"], response_model=Job)
    router.add_api_route("/jobs/{job_id}/cancel", cancel, methods=["POST"], response_model=Job)
    router.add_api_route("/jobs/{job_id}/events", events, methods=["GET"], response_class=EventSourceResponse,
                         responses={200: {"content": {"text/event-stream": {}},
                                          "description": "`state` and `progress` events until the job finishes"}})
    router.add_api_route("/jobs/{job_id}/results", results, methods=["GET"], response_model=dict[str, Any])
    router.add_api_route("/jobs/{job_id}/samples/{task}", samples, methods=["GET"], response_model=SamplePage)
    router.add_api_route("/pool", pool, methods=["GET"], response_model=Pool)
    router.add_api_route("/compare", compare, methods=["GET"], response_model=Comparison)
    router.add_api_route("/leaderboard", leaderboard, methods=["GET"], response_model=Leaderboard)
    router.add_api_route("/watches", list_watches, methods=["GET"], response_model=list[Watch])
    group_api.add_routes(router)
    return router


def submit(body: JobSubmission, request: Request, fleet: FleetDep) -> Submitted:
    """Queue an evaluation, with the same checks as `evalfleet submit` (a job that can never fit is refused);
    its tasks are lm-eval's, a folder under a task root, or the uploaded `task_yaml` (`task_policy`)."""
    try:
        evaluation = EvaluationRequest.model_validate(body.request_fields())
    except ValidationError as error:
        raise UsageError(describe_validation_error(error)) from None
    evaluation = request.app.state.model_roots.admit(evaluation)
    evaluation = request.app.state.task_policy.admit(evaluation, body.task_yaml)
    return Submitted(id=fleet.submit(evaluation))


def list_jobs(
    fleet: FleetDep,
    state: JobState | None = None,
    model: Annotated[str | None, Query(max_length=1024, description="part of the model path")] = None,
    priority: Annotated[str | None, Query(pattern="^(high|normal|low)$")] = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> JobPage:
    """Jobs, newest first."""
    total, jobs = fleet.jobs(state=state, model=model, priority=priority, offset=offset, limit=limit)
    return JobPage(total=total, offset=offset, limit=limit, jobs=jobs)


def get_job(job_id: JobId, fleet: FleetDep) -> dict[str, Any]:
    return fleet.job(job_id)


def cancel(job_id: JobId, fleet: FleetDep) -> dict[str, Any]:
    """Cancel a job; a running one is stopped by the scheduler on its next round."""
    return fleet.cancel(job_id)


async def events(job_id: JobId, request: Request, fleet: FleetDep) -> EventSourceResponse:
    """Server-sent events: every state change (`state`) and progress change (`progress`), until it ends."""
    await asyncio.to_thread(fleet.job, job_id)  # a 404 before the stream starts
    return EventSourceResponse(request.app.state.feeds.follow(job_id))


def results(job_id: JobId, fleet: FleetDep) -> dict[str, Any]:
    """lm-eval's results document with evalfleet's own section."""
    return fleet.results(job_id)


def samples(
    job_id: JobId,
    task: TaskName,
    fleet: FleetDep,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_SAMPLES_PAGE)] = 20,
) -> SamplePage:
    """lm-eval's per-sample records of one task, in document order."""
    total, rows = fleet.samples(job_id, task, offset=offset, limit=limit)
    return SamplePage(job=job_id, task=task, total=total, offset=offset, limit=limit, samples=rows)


def pool(request: Request, fleet: FleetDep) -> dict[str, Any]:
    """The scheduler's devices, who holds each, quarantine, and this machine's latest metrics."""
    monitor = request.app.state.monitor
    latest = monitor.history[-1].model_dump(mode="json") if monitor is not None and monitor.history else None
    return {**fleet.pool(), "monitor": latest}


def compare(
    fleet: FleetDep,
    a: Annotated[str, Query(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")],
    b: Annotated[str, Query(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")],
) -> Comparison:
    """Two succeeded jobs, task by task: both values, the difference, a paired test and the flipped samples."""
    return fleet.compare(a, b)


def leaderboard(
    fleet: FleetDep,
    group: Annotated[str | None, Query(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")] = None,
    baseline: Annotated[str | None, Query(min_length=1, max_length=1024, description="a model (path or folder name) or job id")] = None,
    alpha: Annotated[float, Query(gt=0, lt=1)] = ALPHA,
) -> Leaderboard:
    """A group's (else every) succeeded job ranked: models × tasks, best marked, runs with other settings in
    their own sections, each cell tested against the baseline with compare's paired test."""
    return fleet.leaderboard(group=group, baseline=baseline, alpha=alpha)
