"""The dashboard: server-rendered pages, with htmx refreshing the live parts.

Pages read the fleet through the same functions as the API. Forms post back to the
server (no script needed to submit or cancel); htmx only polls the job table and a
running job's status. The login form opens a session (`sessions.py`): its cookie is
HttpOnly and SameSite=Strict, and every form post must come from the service's own origin.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from evalfleet.orchestrator.states import JobState
from evalfleet.service.api import submit
from evalfleet.service.charts import pool_charts
from evalfleet.service.fleet import Fleet
from evalfleet.service.leaderboard_chart import step_charts
from evalfleet.service.lm_eval_form import LmEvalForm
from evalfleet.service.samples import describe_sample
from evalfleet.service.schemas import MAX_TASK_YAML, JobSubmission
from evalfleet.service.security import COOKIE_NAME, token_matches
from evalfleet.service.sessions import client_address, require_same_origin
from evalfleet.types import EvalfleetError, UsageError, describe_validation_error

templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
templates.env.filters["clock"] = lambda at: time.strftime("%H:%M:%S", time.localtime(at)) if at else ""
templates.env.filters["duration"] = lambda s: "" if s is None else f"{int(s) // 60}m{int(s) % 60:02d}s" if s >= 60 else f"{int(s)}s"
SAMPLES_PAGE = 25  # within the API's MAX_SAMPLES_PAGE


def _fleet(request: Request) -> Fleet:
    return request.app.state.fleet


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def login_page(request: Request, status_code: int = 200, error: str | None = None) -> HTMLResponse:
    return render(request, "login.html", status_code, error=error)


def error_page(request: Request, status_code: int, message: str) -> HTMLResponse:
    return render(request, "error.html", status_code, message=message)


def build_router(dependencies: list[Any]) -> APIRouter:
    open_routes = APIRouter(include_in_schema=False)
    open_routes.add_api_route("/login", login_page, methods=["GET"])
    open_routes.add_api_route("/login", login, methods=["POST"])
    router = APIRouter(include_in_schema=False, dependencies=dependencies)
    for path, endpoint, methods in [
        ("/", jobs_page, ["GET"]), ("/ui/jobs", jobs_table, ["GET"]), ("/jobs", submit_form, ["POST"]),
        ("/logout", logout, ["POST"]), ("/jobs/{job_id}", job_page, ["GET"]),
        ("/ui/jobs/{job_id}/status", job_status, ["GET"]), ("/jobs/{job_id}/cancel", cancel_form, ["POST"]),
        ("/results", results_matrix, ["GET"]), ("/jobs/{job_id}/results", job_results, ["GET"]),
        ("/jobs/{job_id}/samples/{task}", samples_page, ["GET"]),
        ("/jobs/{job_id}/samples/{task}/{doc_id}", sample_page, ["GET"]),
        ("/pool", pool_page, ["GET"]), ("/compare", compare_page, ["GET"]),
        ("/groups/{group_id}", group_page, ["GET"]), ("/ui/groups/{group_id}", group_table, ["GET"]),
    ]:
        router.add_api_route(path, endpoint, methods=methods, response_class=HTMLResponse)
    open_routes.include_router(router)
    return open_routes


def login(request: Request, token: Annotated[str, Form(max_length=512)]) -> Response:
    """Open a session for the right token, from the service's own page, at the throttle's pace."""
    require_same_origin(request, "a login")
    throttle, client = request.app.state.login_throttle, client_address(request)
    wait = math.ceil(throttle.retry_after(client))
    if wait > 0:
        page = login_page(request, 429, error=f"Too many failed logins from this address: try again in {wait} s.")
        page.headers["Retry-After"] = str(wait)
        return page
    service_token = request.app.state.token
    if not token_matches(service_token.current(), token.strip()):
        throttle.failed(client)
        return login_page(request, 401, error="That token is not the service's token.")
    throttle.succeeded(client)
    sessions = request.app.state.sessions
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(COOKIE_NAME, sessions.open(service_token.fingerprint()), max_age=math.ceil(sessions.ttl_s),
                        httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return response


def logout(request: Request) -> Response:
    """End this session on the server, not only in the browser."""
    request.app.state.sessions.close(request.cookies.get(COOKIE_NAME))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE_NAME, httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return response


def jobs_page(request: Request) -> HTMLResponse:
    total, jobs = _fleet(request).jobs(limit=50)
    return render(request, "jobs.html", jobs=jobs, total=total, form={}, error=None)


def jobs_table(request: Request) -> HTMLResponse:
    total, jobs = _fleet(request).jobs(limit=50)
    return render(request, "_jobs_table.html", jobs=jobs, total=total)


def submit_form(
    request: Request,
    model: Annotated[str, Form(max_length=1024)],
    lm_eval: Annotated[LmEvalForm, Depends(LmEvalForm.from_form)],
    tasks: Annotated[str, Form(max_length=2048)] = "demo_mc,demo_arith",
    limit: Annotated[str, Form(max_length=12)] = "",
    priority: Annotated[str, Form(max_length=12)] = "normal",
    log_samples: Annotated[bool, Form()] = False,
    task_yaml: Annotated[str, Form(max_length=MAX_TASK_YAML)] = "",
) -> Response:
    form = {"model": model, "tasks": tasks, "limit": limit, "priority": priority, "log_samples": log_samples,
            "task_yaml": task_yaml, **lm_eval.shown()}
    try:
        submission = JobSubmission.model_validate({
            "model": model.strip(), "tasks": [t.strip() for t in tasks.split(",") if t.strip()],
            "limit": limit.strip() or None, "priority": priority, "log_samples": log_samples,
            "task_yaml": task_yaml if task_yaml.strip() else None, **lm_eval.submission_fields(),
        })
    except ValidationError as error:
        return _form_error(request, form, describe_validation_error(error))
    except UsageError as error:
        return _form_error(request, form, str(error))
    try:
        job_id = submit(submission, request, _fleet(request)).id
    except EvalfleetError as error:
        return _form_error(request, form, str(error))
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


def _form_error(request: Request, form: dict[str, Any], message: str) -> HTMLResponse:
    total, jobs = _fleet(request).jobs(limit=50)
    return render(request, "jobs.html", 422, jobs=jobs, total=total, form=form, error=message)


def job_page(request: Request, job_id: str) -> HTMLResponse:
    return render(request, "job.html", job=_fleet(request).job(job_id))


def job_status(request: Request, job_id: str) -> HTMLResponse:
    return render(request, "_job_status.html", job=_fleet(request).job(job_id))


def group_page(request: Request, group_id: str) -> HTMLResponse:
    """A sweep's (or a watch's) jobs, their states and links, refreshed while any runs."""
    return render(request, "group.html", group=_fleet(request).group(group_id))


def group_table(request: Request, group_id: str) -> HTMLResponse:
    return render(request, "_group_jobs.html", group=_fleet(request).group(group_id))


def cancel_form(request: Request, job_id: str) -> Response:
    _fleet(request).cancel(job_id)
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


def results_matrix(request: Request,
                   group: Annotated[str, Query(max_length=64)] = "",
                   baseline: Annotated[str, Query(max_length=1024)] = "") -> HTMLResponse:
    """The leaderboard of a group's (or every) finished job, against a baseline if one is chosen."""
    fleet = _fleet(request)
    board, error = None, None
    try:
        board = fleet.leaderboard(group=group or None, baseline=baseline or None)
    except EvalfleetError as error_:
        error = str(error_)
    return render(request, "results.html", groups=fleet.groups(), group=group, baseline=baseline, board=board,
                  error=error, charts=[step_charts(section) for section in board.sections] if board else [])


def job_results(request: Request, job_id: str) -> HTMLResponse:
    fleet = _fleet(request)
    run = fleet.run(job_id)
    tasks = []
    for task, metrics in run.document["results"].items():
        rows = []
        for key, value in metrics.items():
            if "," in key and "_stderr" not in key:
                metric, _, filter_name = key.partition(",")
                rows.append({"metric": metric, "filter": filter_name, "value": value,
                             "stderr": metrics.get(f"{metric}_stderr,{filter_name}")})
        tasks.append({"name": task, "metrics": rows, "has_samples": run.samples(task) is not None})
    return render(request, "job_results.html", job=fleet.job(job_id), tasks=tasks,
                  evalfleet=run.document.get("evalfleet", {}))


def samples_page(request: Request, job_id: str, task: str,
                 offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0) -> HTMLResponse:
    total, rows = _fleet(request).samples(job_id, task, offset=offset, limit=SAMPLES_PAGE)
    return render(request, "samples.html", job_id=job_id, task=task, total=total, offset=offset,
                  page=SAMPLES_PAGE, samples=[describe_sample(row) for row in rows])


def sample_page(request: Request, job_id: str, task: str, doc_id: int) -> HTMLResponse:
    row = _fleet(request).sample(job_id, task, doc_id)
    return render(request, "sample.html", job_id=job_id, task=task, sample=describe_sample(row))


def pool_page(request: Request) -> HTMLResponse:
    monitor = request.app.state.monitor
    history = monitor.history if monitor is not None else []
    return render(request, "pool.html", pool=_fleet(request).pool(), charts=pool_charts(history),
                  latest=history[-1] if history else None)


def compare_page(request: Request,
                 a: Annotated[str, Query(max_length=64)] = "",
                 b: Annotated[str, Query(max_length=64)] = "") -> HTMLResponse:
    fleet = _fleet(request)
    _, finished = fleet.jobs(state=JobState.SUCCEEDED, limit=200)
    comparison, error = None, None
    if a and b:
        try:
            comparison = fleet.compare(a, b)
        except EvalfleetError as error_:
            error = str(error_)
    return render(request, "compare.html", jobs=finished, a=a, b=b, comparison=comparison, error=error)
