"""Running the `evalfleet` command in tests: in-process for speed, as a subprocess for the real thing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_main(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """`evalfleet ARGS` through cli.main() in this process; returns (exit code, stdout, stderr)."""
    from evalfleet import cli

    monkeypatch.setattr(sys, "argv", ["evalfleet", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def evalfleet_command() -> list[str]:
    return [sys.executable, "-m", "evalfleet.cli"]


def run_subprocess(args: list[str], env: dict[str, str] | None = None, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [*evalfleet_command(), *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=kwargs.pop("cwd", None), **kwargs
    )
