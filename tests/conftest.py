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


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own request cache and job store unless it says otherwise."""
    monkeypatch.setenv("EVALFLEET_CACHE", str(tmp_path / "cache.sqlite"))
    monkeypatch.setenv("EVALFLEET_DB", str(tmp_path / "jobs.sqlite"))
    return tmp_path / "cache.sqlite"
