"""The single-device path on transformers 5.17, the version on the GPU check machines.

`make test` installs 5.17 into an overlay folder (.tf517) that goes before the venv's packages;
the backend's tests (packing, prefix reuse, their guards) run again on it in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clitools import REPO

OVERLAY = REPO / ".tf517"


@pytest.mark.skipif(not (OVERLAY / ".installed").exists(), reason="make test installs the transformers 5.17 overlay")
def test_backend_tests_pass_on_transformers_5_17():
    env = {**os.environ, "PYTHONPATH": str(OVERLAY)}
    version = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert version == "5.17.0"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-cov", str(REPO / "tests" / "runtime" / "test_hf_backend.py")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:]
