"""Fixtures for the distributed engine: a tiny Llama (pipeline splits need its layout), token-level
requests with left padding, varied lengths and generation, and the single-process reference.

Worker groups cost seconds to start, so tests share them through module-scoped fixtures.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed_support import single_process_reference
from tinymodels import build_tiny_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("dist") / "tiny-llama", family="llama")


@pytest.fixture(scope="module")
def requests_and_reference(llama):
    """The requests and their results from one process on one device (the lightweight engine's runner)."""
    return single_process_reference(llama)
