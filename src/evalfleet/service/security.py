"""Who may use the service, and what they may submit through it.

One shared token guards everything but `/healthz`: sent as `Authorization: Bearer`, or
exchanged at the login form for a session (`service/sessions.py`). Tokens are compared in
constant time, and a token kept in a file is re-read when the file changes, so a new token
takes effect (and ends every session) without a restart. Models submitted over HTTP are
resolved once, strictly (links followed, the folder must exist) and must lie under the
allowed roots: the API must not become a way to read arbitrary folders of the server's
machine. Hub ids are accepted only where the operator allows them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import secrets
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from evalfleet.types import EvalfleetError, EvaluationRequest, UsageError

TOKEN_VARIABLE = "EVALFLEET_TOKEN"
COOKIE_NAME = "evalfleet_session"
MIN_TOKEN_LENGTH = 16
MIN_EXPOSED_TOKEN_LENGTH = 32
"""A service reachable from other machines needs a token long enough to withstand guessing."""
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


class Forbidden(EvalfleetError):
    """A request the service will not carry out for anyone (HTTP 403)."""


@dataclass(frozen=True)
class Token:
    value: str
    source: str
    """Where it came from: the file, the variable, or the file just created."""
    created: bool = False
    explicit: bool = False
    """Chosen by the user (`--token-file` or the variable), not the user data folder's file."""
    path: Path | None = None
    """The file it was read from (re-read when it changes); None for the variable."""


def default_token_path() -> Path:
    return platformdirs.user_data_path("evalfleet") / "service-token"


def resolve_token(token_file: str | None, *, create_at: Path | None = None) -> Token:
    """`--token-file`, else `$EVALFLEET_TOKEN`, else the user's token file (created 0600 if missing)."""
    if token_file is not None:
        path = Path(token_file).expanduser().absolute()
        return Token(_read_token(path), str(token_file), explicit=True, path=path)
    from_env = os.environ.get(TOKEN_VARIABLE)
    if from_env is not None:
        return Token(_checked(from_env.strip(), f"${TOKEN_VARIABLE}"), f"${TOKEN_VARIABLE}", explicit=True)
    path = create_at or default_token_path()
    if path.exists():
        return Token(_read_token(path), str(path), path=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(value + "\n")
    return Token(value, str(path), created=True, path=path)


def _read_token(path: Path) -> str:
    try:
        return _checked(path.read_text().strip(), str(path))
    except FileNotFoundError:
        raise UsageError(f"no token file at {path}") from None
    except OSError as error:
        raise UsageError(f"cannot read the token file {path}: {error.strerror}") from None


def _checked(value: str, where: str) -> str:
    if len(value) < MIN_TOKEN_LENGTH:
        raise UsageError(f"the token in {where} is shorter than {MIN_TOKEN_LENGTH} characters")
    return value


def token_matches(expected: str | None, given: str | None) -> bool:
    return expected is not None and given is not None and secrets.compare_digest(expected.encode(), given.encode())


class ServiceToken:
    """The token the service checks now: a file's is re-read when the file changes.

    A file that disappears or no longer holds a valid token (at least `min_length`
    characters) lets nobody in (fails closed) until it is fixed. `fingerprint` ties sessions to the token they were opened under.
    """

    def __init__(self, value: str, path: Path | None = None, min_length: int = MIN_TOKEN_LENGTH) -> None:
        self._path, self._value, self._min_length = path, value, min_length
        self._seen = self._stat()
        self._lock = threading.Lock()

    def _stat(self) -> tuple[int, int, int] | None:
        if self._path is None:
            return None
        try:
            found = self._path.stat()
        except OSError:
            return None
        return found.st_mtime_ns, found.st_size, found.st_ino

    def current(self) -> str | None:
        if self._path is None:
            return self._value
        seen = self._stat()
        with self._lock:
            if seen != self._seen:
                try:
                    value = _read_token(self._path) if seen is not None else None
                except UsageError:
                    value = None
                self._value = value if value is not None and len(value) >= self._min_length else None
                self._seen = seen
            return self._value

    def fingerprint(self) -> bytes | None:
        value = self.current()
        return None if value is None else hashlib.sha256(value.encode()).digest()


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or a name that resolves only to them (`localhost`)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def token_min_length(host: str) -> int:
    return MIN_TOKEN_LENGTH if is_loopback(host) else MIN_EXPOSED_TOKEN_LENGTH


def check_host(host: str, token: Token) -> None:
    """Refuse to listen beyond this machine unless the user chose a long token themselves, every time."""
    if is_loopback(host):
        return
    if not token.explicit:
        raise UsageError(
            f"--host {host} is reachable from other machines: give a token with --token-file or "
            f"${TOKEN_VARIABLE} to serve there"
        )
    if len(token.value) < token_min_length(host):
        raise UsageError(f"--host {host} is reachable from other machines: the token in {token.source} must be "
                         f"at least {MIN_EXPOSED_TOKEN_LENGTH} characters to serve there")


def check_forwarded_allow_ips(value: str | None) -> None:
    """Each entry an address, a network or `*`: uvicorn would take anything else as a literal name silently."""
    for entry in (value or "").split(","):
        entry = entry.strip()
        if entry == "*":
            continue
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise UsageError(f"--forwarded-allow-ips: '{entry}' is not an address, a network or '*'") from None


def root_folders(paths: list[str], option: str) -> list[Path]:
    """An operator's root folders (`--model-root`, `--task-root`, ...), resolved; each must be a folder."""
    folders = [Path(path).expanduser().resolve() for path in paths]
    for folder in folders:
        if not folder.is_dir():
            raise UsageError(f"{option} {folder} is not a folder")
    return folders


def resolve_under(path: str, roots: list[Path], what: str, kind: str) -> Path:
    """`path` resolved strictly (absolute, links followed, must exist), and under one of `roots`.

    Outside the roots is said before whether the path exists, so a client learns nothing
    about the rest of the machine; a link under a root that leads outside is outside.
    """
    where = ", ".join(str(r) for r in roots) or f"none given (--{kind}-root)"
    given = Path(path)
    if not given.is_absolute():
        raise Forbidden(f"the {what} {path} is not an absolute path; give it as one under {where}")
    if not any(Path(os.path.normpath(given)).is_relative_to(root) for root in roots):
        raise Forbidden(f"the {what} {path} is outside the allowed {kind} roots ({where})")
    try:
        resolved = given.resolve(strict=True)
    except (OSError, RuntimeError):
        raise Forbidden(f"the {what} {path} does not exist on the server") from None
    if not any(resolved.is_relative_to(root) for root in roots):
        raise Forbidden(f"the {what} {path} leads outside the allowed {kind} roots ({where})")
    return resolved


class ModelRoots:
    """The folders under which submitted models may lie; the demo model always may.

    `admit` returns the request with its model path resolved once, absolute: nothing later
    resolves it again against another working folder. Hub ids pass only with `allow_hub`.
    """

    def __init__(self, roots: list[str] | None = None, *, allow_hub: bool = False) -> None:
        self.roots = root_folders(roots or [], "--model-root")
        self.allow_hub = allow_hub

    def model_path(self, path: str) -> str:
        if path == "demo":  # the bundled model: every process resolves the name to the same folder
            return path
        if self.allow_hub and HUB_ID.match(path) and ".." not in path:
            if Path(path).exists():  # the worker would load that folder instead of the hub's model
                raise Forbidden(f"the model {path} names both a hub id and a folder of the server's; "
                                "give the folder as an absolute path")
            return path
        if not Path(path).is_absolute() and not self.allow_hub:
            raise Forbidden(f"the model {path} is not a folder under the allowed model roots; hub ids are "
                            "accepted only when the service runs with --allow-hub")
        resolved = resolve_under(path, self.roots, "model", "model")
        if not resolved.is_dir():
            raise Forbidden(f"the model {path} is not a folder")
        return str(resolved)

    def admit(self, request: EvaluationRequest) -> EvaluationRequest:
        """The request as the service will store it, or Forbidden with the reason."""
        model = request.model.model_copy(update={"path": self.model_path(request.model.path)})
        request = request.model_copy(update={"model": model})
        self.check(request)
        return request

    def check(self, request: EvaluationRequest) -> None:
        if request.model.trust_remote_code:
            raise Forbidden("trust_remote_code cannot be turned on through the service")
