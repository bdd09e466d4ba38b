"""Fixtures for the distributed engine: a tiny Llama (pipeline splits need its layout), token-level
requests with left padding, varied lengths and generation, and the single-process reference.

Worker groups cost seconds to start, so tests share them through module-scoped fixtures.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed_support import make_requests, run_all
from tinymodels import build_tiny_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("dist") / "tiny-llama", family="llama")


@pytest.fixture(scope="module")
def requests_and_reference(llama):
    """The requests and their results from one process on one device (the lightweight engine's runner)."""
    import torch

    from evalfleet.runtime.backends.hf import HFBackend
    from evalfleet.runtime.runner import InProcessRunner

    backend = HFBackend.load(str(llama), dtype="float32", device="cpu")
    batches = make_requests(len(backend.tokenizer), backend.max_length)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = run_all(InProcessRunner(backend, "cpu"), batches)
    finally:
        torch.set_num_threads(threads)
        backend.close()
    return batches, reference
