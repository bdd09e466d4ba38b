"""Browser sessions, the login throttle and the same-origin rule for cookie-carried requests.

The login form exchanges the token for a random session id: the cookie never holds the
token itself, so logging out ends that session for good, and a new token (the token file
rewritten) ends them all, since each session remembers the fingerprint of the token it was
opened under. Sessions live in the server's memory: a restart ends them too.

A cookie is sent by the browser whatever page asks, and SameSite=Strict does not stop a
page on another port or subdomain of the same site; so every state-changing request that
rides on the cookie (and the login form itself) must come from the service's own origin,
as its `Origin` header (or, lacking one, its `Referer`) says.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request

from evalfleet.service.security import Forbidden

SESSION_TTL_S = 12 * 3600.0
MAX_SESSIONS = 10_000
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


class Sessions:
    """Open sessions by the hash of their id (the ids themselves are kept nowhere on the server)."""

    def __init__(self, ttl_s: float = SESSION_TTL_S, max_sessions: int = MAX_SESSIONS) -> None:
        self.ttl_s, self.max_sessions = ttl_s, max_sessions
        self._open: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, token_fingerprint: bytes) -> str:
        session_id = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            for key in [k for k, (expires, _) in self._open.items() if expires <= now]:
                del self._open[key]
            while len(self._open) >= self.max_sessions:
                self._open.popitem(last=False)  # the oldest session gives way
            self._open[_digest(session_id)] = (now + self.ttl_s, token_fingerprint)
        return session_id

    def valid(self, session_id: str | None, token_fingerprint: bytes | None) -> bool:
        if not session_id or token_fingerprint is None:
            return False
        key = _digest(session_id)
        with self._lock:
            found = self._open.get(key)
            if found is None:
                return False
            expires, opened_under = found
            if expires <= time.monotonic() or not secrets.compare_digest(opened_under, token_fingerprint):
                del self._open[key]
                return False
            return True

    def close(self, session_id: str | None) -> None:
        if session_id:
            with self._lock:
                self._open.pop(_digest(session_id), None)


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0


class LoginThrottle:
    """Per client address: after `free` failed logins, each further try waits twice as long as the last.

    The waits start at one second and stop growing at `max_wait_s`; a success, or an hour
    without failures, forgets the address. Only the newest `max_clients` addresses are kept.
    """

    def __init__(self, free: int = 5, max_wait_s: float = 900.0, forget_s: float = 3600.0,
                 max_clients: int = 10_000) -> None:
        self.free, self.max_wait_s, self.forget_s, self.max_clients = free, max_wait_s, forget_s, max_clients
        self._clients: OrderedDict[str, _Failures] = OrderedDict()
        self._lock = threading.Lock()

    def _wait_after(self, failures: int) -> float:
        return 0.0 if failures < self.free else min(2.0 ** (failures - self.free), self.max_wait_s)

    def retry_after(self, client: str) -> float:
        """Seconds before `client` may try again (0 when it may now)."""
        now = time.monotonic()
        with self._lock:
            found = self._clients.get(client)
            if found is None:
                return 0.0
            if now - found.last > self.forget_s:
                del self._clients[client]
                return 0.0
            return max(0.0, found.last + self._wait_after(found.count) - now)

    def failed(self, client: str) -> None:
        with self._lock:
            found = self._clients.pop(client, None) or _Failures()
            found.count += 1
            found.last = time.monotonic()
            self._clients[client] = found
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)


def _origin(url: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)


def same_origin(request: Request) -> bool:
    """Whether the request names the service's own origin (scheme, host and port) as where it came from.

    The service's origin is the `Host` it was reached at with the scheme it was reached by
    (behind a proxy: the scheme the trusted proxy reports). A missing or opaque (`null`)
    origin with no referer is not the service's.
    """
    host = request.headers.get("host")
    if not host:
        return False
    own = _origin(f"{request.url.scheme}://{host}")
    claimed = request.headers.get("origin")
    if not claimed or claimed == "null":
        claimed = request.headers.get("referer")
    return own is not None and claimed is not None and _origin(claimed) == own


def require_same_origin(request: Request, what: str) -> None:
    if not same_origin(request):
        raise Forbidden(f"{what} must come from the service's own pages: its Origin (or Referer) header is "
                        "missing or names another origin")


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"
