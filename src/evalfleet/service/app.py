"""The web application: the API, the dashboard, /metrics and /healthz behind one token.

Errors leave as one sentence (`{"detail": ...}`) with the status the error's kind calls for;
a browser without a session gets the login page with its 401. Behind a reverse proxy, the
proxy's `X-Forwarded-Proto`/`-For` are believed only from the addresses the operator names
(`forwarded_allow_ips`): they decide the `Secure` cookie, the origin check and the login
throttle's client address.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from evalfleet.monitoring.monitor import MultiGPUPerformanceMonitor
from evalfleet.service import dashboard
from evalfleet.service.api import build_router
from evalfleet.service.feeds import JobFeeds
from evalfleet.service.fleet import Conflict, Fleet, NotFound
from evalfleet.service.metrics import render_metrics
from evalfleet.service.schemas import Health, Problem
from evalfleet.service.security import (
    COOKIE_NAME,
    MIN_TOKEN_LENGTH,
    Forbidden,
    ModelRoots,
    ServiceToken,
    token_matches,
)
from evalfleet.service.sessions import SAFE_METHODS, SESSION_TTL_S, LoginThrottle, Sessions, require_same_origin
from evalfleet.service.task_policy import TaskPolicy
from evalfleet.types import EvalfleetError

MAX_BODY_BYTES = 64 * 1024
STATIC = Path(__file__).parent / "static"


class Unauthorized(Exception):
    """No valid token with the request (HTTP 401)."""


@dataclass
class ServiceConfig:
    db_path: Path
    token: str
    model_roots: ModelRoots
    task_roots: list[str] = field(default_factory=list)
    """Folders of the operator's tasks, which a job may name as its include_path (trusted: they may run code)."""
    data_roots: list[str] = field(default_factory=list)
    """Folders an uploaded task YAML may read dataset files from (besides the task roots)."""
    token_file: Path | None = None
    """The file `token` was read from: re-read when it changes (a new token ends every session)."""
    token_min_length: int = MIN_TOKEN_LENGTH
    """What a token re-read from the file must have (more when the service is reachable from other machines)."""
    forwarded_allow_ips: str | None = None
    """Proxies whose X-Forwarded-Proto/-For are believed (comma-separated addresses or networks, or *)."""
    session_ttl_s: float = SESSION_TTL_S
    monitor_interval_s: float | None = 2.0
    """Seconds between the monitor's samples of this machine; None runs no monitor."""
    monitor_history: int = 300


def require_token(request: Request) -> None:
    """A valid bearer token (compared in constant time), or a live session from the service's own pages.

    A state-changing request that rides on the cookie must name the service's origin: the
    browser attaches the cookie whatever page sends the request.
    """
    token: ServiceToken = request.app.state.token
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer" and token_matches(token.current(), credentials.strip()):
        return
    if request.app.state.sessions.valid(request.cookies.get(COOKIE_NAME), token.fingerprint()):
        if request.method not in SAFE_METHODS:
            require_same_origin(request, "a change made with the dashboard's session cookie")
        return
    raise Unauthorized()


class BodyLimit:
    """Refuse request bodies over `limit` bytes (413), declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _too_large(self.limit)(scope, receive, send)
            return
        seen, too_large = 0, False

        async def counted() -> Message:
            nonlocal seen, too_large
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                too_large = True
                return {"type": "http.disconnect"}  # the app stops reading; its answer is replaced below
            return message

        async def guarded_send(message: Message) -> None:
            if not too_large:
                await send(message)

        await self.app(scope, counted, guarded_send)
        if too_large:
            await _too_large(self.limit)(scope, receive, send)


def _too_large(limit: int) -> Response:
    return JSONResponse({"detail": f"the request body is larger than {limit // 1024} KiB"}, status_code=413)


def _problem(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status,
                        headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith("/api/") and "text/html" in request.headers.get("accept", "")


def create_app(config: ServiceConfig) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if config.monitor_interval_s is None:
            yield
            return
        monitor = MultiGPUPerformanceMonitor(interval=config.monitor_interval_s, history=config.monitor_history)
        app.state.monitor = monitor.start(job=False)
        try:
            yield
        finally:
            monitor.close()

    # The OpenAPI document is served behind the token too; the interactive docs would need a CDN.
    app = FastAPI(title="evalfleet", version="1", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None,
                  description="Submit, watch and compare evaluations on an evalfleet pool. "
                              "Every route but /healthz needs the service token as `Authorization: Bearer`.")
    app.state.fleet = Fleet(config.db_path)
    app.state.token = ServiceToken(config.token, config.token_file, config.token_min_length)
    app.state.sessions = Sessions(config.session_ttl_s)
    app.state.login_throttle = LoginThrottle()
    app.state.model_roots = config.model_roots
    app.state.task_policy = TaskPolicy(config.task_roots, config.data_roots, config.db_path.parent / "uploaded-tasks")
    app.state.monitor = None
    app.state.feeds = JobFeeds(app.state.fleet)
    app.state.scheduler = None  # `serve` puts its SchedulerSupervisor here, for /healthz
    guarded = [Depends(require_token)]

    app.include_router(build_router(guarded))
    app.add_api_route("/metrics", _metrics, methods=["GET"], dependencies=guarded, response_class=PlainTextResponse,
                      responses={200: {"content": {"text/plain": {}}}, 401: {"model": Problem}},
                      summary="Prometheus metrics: jobs by state, queue wait, tokens/s, and the monitor's DCGM series")
    app.add_api_route("/healthz", _health, methods=["GET"], response_model=Health,
                      responses={503: {"model": Health, "description": "serve's scheduler is down, being restarted"}})
    app.add_api_route("/openapi.json", lambda: JSONResponse(app.openapi()), methods=["GET"], dependencies=guarded,
                      include_in_schema=False)
    app.include_router(dashboard.build_router(guarded))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    statuses = {NotFound: 404, Conflict: 409, Forbidden: 403}

    @app.exception_handler(EvalfleetError)
    async def _evalfleet_error(request: Request, error: EvalfleetError) -> Response:
        status = next((code for kind, code in statuses.items() if isinstance(error, kind)), 422)
        if _wants_html(request):
            return dashboard.error_page(request, status, str(error))
        return _problem(status, str(error))

    @app.exception_handler(Unauthorized)
    async def _unauthorized(request: Request, error: Unauthorized) -> Response:
        if _wants_html(request):
            return dashboard.login_page(request, status_code=401)
        return _problem(401, "this needs the service token (Authorization: Bearer TOKEN)")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _problem(422, f"invalid value for '{where}': {first.get('msg', 'is invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> Response:
        return _problem(error.status_code, str(error.detail))

    app.add_middleware(BodyLimit)
    if config.forwarded_allow_ips:
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=config.forwarded_allow_ips)
    return app


def _metrics(request: Request) -> PlainTextResponse:
    text = render_metrics(request.app.state.fleet, request.app.state.monitor)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def _health(request: Request) -> JSONResponse:
    """503 while the scheduler `serve` runs is down: jobs are accepted but none starts."""
    supervisor = request.app.state.scheduler
    scheduler = "external" if supervisor is None else supervisor.state
    down = scheduler == "restarting"
    return JSONResponse({"status": "degraded" if down else "ok", "scheduler": scheduler}, status_code=503 if down else 200)
