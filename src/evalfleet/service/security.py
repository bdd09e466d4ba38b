"""Who may use the service, and what they may submit through it.

One shared token guards everything but `/healthz`: sent as `Authorization: Bearer`, or
kept by the browser in an HttpOnly, SameSite=Strict cookie after the login form. Tokens
are compared in constant time. Model and task folders submitted over HTTP must lie under
the allowed roots: the API must not become a way to read arbitrary folders of the
server's machine.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from evalfleet.types import DEMO_MODEL_DIR, EvalfleetError, EvaluationRequest, UsageError, resolve_model_path

TOKEN_VARIABLE = "EVALFLEET_TOKEN"
COOKIE_NAME = "evalfleet_session"
MIN_TOKEN_LENGTH = 16


class Forbidden(EvalfleetError):
    """A request the service will not carry out for anyone (HTTP 403)."""


@dataclass(frozen=True)
class Token:
    value: str
    source: str
    """Where it came from: the file, the variable, or the file just created."""
    created: bool = False


def default_token_path() -> Path:
    return platformdirs.user_data_path("evalfleet") / "service-token"


def resolve_token(token_file: str | None, *, create_at: Path | None = None) -> Token:
    """`--token-file`, else `$EVALFLEET_TOKEN`, else the user's token file (created 0600 if missing)."""
    if token_file is not None:
        return Token(_read_token(Path(token_file).expanduser()), str(token_file))
    from_env = os.environ.get(TOKEN_VARIABLE)
    if from_env is not None:
        return Token(_checked(from_env.strip(), f"${TOKEN_VARIABLE}"), f"${TOKEN_VARIABLE}")
    path = create_at or default_token_path()
    if path.exists():
        return Token(_read_token(path), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(value + "\n")
    return Token(value, str(path), created=True)


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


def token_matches(expected: str, given: str | None) -> bool:
    return given is not None and secrets.compare_digest(expected.encode(), given.encode())


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


def check_host(host: str, token: Token) -> None:
    """Refuse to listen beyond this machine unless the user chose the token themselves."""
    if not is_loopback(host) and token.created:
        raise UsageError(
            f"--host {host} is reachable from other machines: give a token with --token-file or "
            f"${TOKEN_VARIABLE} to serve there"
        )


class ModelRoots:
    """The folders under which submitted models and task folders may lie; the demo model always may."""

    def __init__(self, roots: list[str] | None = None) -> None:
        self.roots = [Path(root).expanduser().resolve() for root in roots or ()]
        for root in self.roots:
            if not root.is_dir():
                raise UsageError(f"--model-root {root} is not a folder")

    def _allowed(self, path: str) -> bool:
        resolved = Path(resolve_model_path(path)).resolve()
        if resolved == DEMO_MODEL_DIR:
            return True
        return any(resolved.is_relative_to(root) for root in self.roots)

    def check(self, request: EvaluationRequest) -> None:
        if not self._allowed(request.model.path):
            where = ", ".join(str(r) for r in self.roots) or "none given (only the demo model)"
            raise Forbidden(f"the model {request.model.path} is outside the allowed model roots ({where})")
        include = request.tasks.include_path
        if include is not None and not (self.roots and self._allowed(include)):
            raise Forbidden(f"the task folder {include} is outside the allowed model roots")
        if request.model.trust_remote_code:
            raise Forbidden("trust_remote_code cannot be turned on through the service")
