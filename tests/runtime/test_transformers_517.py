"""The single-device path on transformers 5.17, the version on the GPU check machines.

`make test` installs 5.17 into an overlay folder (.tf517) that goes before the venv's packages;
the backend's tests (packing, prefix reuse, continuous batching, their guards) run again on it in a
subprocess, and
the layout check refuses transformers' tp/pp layouts on it (they need 5.24's parallel internals).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clitools import REPO
from tinymodels import build_tiny_model

OVERLAY = REPO / ".tf517"
NEEDS_OVERLAY = pytest.mark.skipif(
    not (OVERLAY / ".installed").exists(), reason="make test installs the transformers 5.17 overlay"
)
# check_layout for tp=1, tp=2 and pp=2, one line each: "ok" or the refusal.
CHECK = """
import sys
from evalfleet.runtime.group import GroupSpec, check_layout
from evalfleet.types import EvalfleetError
for tp, pp in ((1, 1), (2, 1), (1, 2)):
    try:
        check_layout(GroupSpec(sys.argv[1], tp=tp, pp=pp))
        print("ok")
    except EvalfleetError as error:
        print(error)
"""


@NEEDS_OVERLAY
def test_backend_tests_pass_on_transformers_5_17():
    env = {**os.environ, "PYTHONPATH": str(OVERLAY)}
    version = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert version == "5.17.0"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-cov",
         *(str(REPO / "tests" / "runtime" / name) for name in ("test_hf_backend.py", "test_continuous_generation.py", "test_cascade.py"))],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:]


@NEEDS_OVERLAY
def test_layout_check_refuses_transformers_splits_before_5_24(tmp_path):
    model = build_tiny_model(tmp_path / "llama", family="llama")

    def check(env: dict[str, str]) -> list[str]:
        done = subprocess.run([sys.executable, "-c", CHECK, str(model)], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.splitlines()

    assert check(dict(os.environ)) == ["ok", "ok", "ok"]  # the venv's transformers 5.24 splits this model
    single, tp, pp = check({**os.environ, "PYTHONPATH": str(OVERLAY)})
    assert single == "ok"
    for line, path in ((tp, "transformers-tp"), (pp, "transformers-pp")):
        assert line == (
            f"the {path} layout needs transformers 5.24 or newer and 5.17.0 is installed; "
            "upgrade transformers or use --strategy dp"
        )
