"""The environment that turns on a test-only fault in worker-group ranks (see faults/sitecustomize.py)."""

from __future__ import annotations

import os
from pathlib import Path

FAULTS = Path(__file__).parent / "faults"


def fault_env(fault: str) -> dict[str, str]:
    """Variables for a worker group's `env`, or a CLI subprocess's environment."""
    path = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH", "")) if p)
    return {"EVALFLEET_TEST_FAULT": fault, "PYTHONPATH": path}
