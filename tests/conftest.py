"""Shared fixtures: a tiny model (see tinymodels.py) and isolated caches and job stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tinymodels import build_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A GPT-NeoX model: a different architecture from the Llama demo model."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-neox")


@pytest.fixture(scope="session")
def shared_job_sizes(tmp_path_factory) -> Path:
    """Job sizes counted at submit, shared by the whole session (as on a user's machine, where
    the same tasks for the same tokenizer are counted once); tests of the counting itself use
    a folder of their own."""
    return tmp_path_factory.mktemp("job-sizes")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch, shared_job_sizes):
    """Each test gets its own request cache and job store unless it says otherwise."""
    monkeypatch.setenv("EVALFLEET_CACHE", str(tmp_path / "cache.sqlite"))
    monkeypatch.setenv("EVALFLEET_DB", str(tmp_path / "jobs.sqlite"))
    monkeypatch.setenv("EVALFLEET_SIZES", str(shared_job_sizes))
    monkeypatch.setenv("EVALFLEET_CALIBRATION", str(tmp_path / "calibration.sqlite"))
    return tmp_path / "cache.sqlite"


# The suite runs in two parts (see the Makefile's `test`): every other module on two pytest-xdist
# workers, one module per worker at a time (`--dist loadfile`, so a module's shared fixtures, a Ray
# cluster or a vLLM run, are built once), then these modules alone, because they time real faults
# against real waits (Ray's 3-second node health checks, a data-parallel job resized while it runs, a
# vLLM replica's node lost) that a neighbour's load would stretch.
SERIAL_MODULES = (
    "orchestrator/test_ray_cluster.py", "orchestrator/test_e2e_live_resize.py", "vllm_backend/test_vllm_ray.py",
)


# The longest modules (measured: `--durations` of the CI runs) go first, so that the two workers end
# together; in file order the vLLM module (several minutes) started last and ran alone at the end.
LONGEST_FIRST = (
    "vllm_backend/test_vllm_backend.py", "orchestrator/test_chaos.py", "service/test_browser.py",
    "distributed/test_workers.py", "orchestrator/test_e2e_failures.py", "orchestrator/test_e2e_scheduler.py",
    "orchestrator/test_watch.py", "orchestrator/test_standby.py", "orchestrator/test_sweeps.py",
)


def pytest_collection_modifyitems(items):
    tests = Path(__file__).parent
    for item in items:
        if item.path.relative_to(tests).as_posix() in SERIAL_MODULES:
            item.add_marker(pytest.mark.serial)

    def rank(item) -> int:
        module = item.path.relative_to(tests).as_posix()
        return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: every module's tests keep their order
