"""Loading a task's data sends no download count to the Hub (`tasks.dataset_loads_uncounted`):
recorded at the network boundary, `datasets`' HTTP session."""

from __future__ import annotations

import pytest
from datasets import config, load

from evalfleet.engines.job_size import job_size
from evalfleet.tasks import build_task_manager
from evalfleet.types import EvaluationRequest


class _Session:
    """Records every request `datasets` makes; each one fails as on a machine without the internet."""

    def __init__(self, sent: list[str]) -> None:
        self.sent = sent

    def __getattr__(self, method: str):
        def request(url, *args, **kwargs):
            self.sent.append(f"{method.upper()} {url}")
            raise ConnectionError("no network here")

        return request


@pytest.fixture
def sent(monkeypatch, tmp_path) -> list[str]:
    """Requests `datasets` sends, on a machine not marked offline (the tests' own setting lifted)."""
    requests: list[str] = []
    monkeypatch.setattr(config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(config, "HF_UPDATE_DOWNLOAD_COUNTS", True)  # datasets' default; restored after
    monkeypatch.setattr(load, "get_session", lambda: _Session(requests))
    monkeypatch.setenv("EVALFLEET_SIZES", str(tmp_path / "sizes"))
    return requests


def _count(tmp_path) -> dict:
    return job_size(EvaluationRequest.model_validate({
        "model": {"path": "demo"}, "tasks": {"names": ["demo_arith", "demo_mc"]},
        "cache_path": str(tmp_path / "cache.sqlite"), "use_cache": False,
    }))


def test_local_tasks_load_without_a_request_to_the_hub(sent, tmp_path, monkeypatch):
    build_task_manager(["demo_arith"]).load(["demo_arith"])  # lm-eval's own load counts the json builder
    assert sent and all("json" in url for url in sent), sent
    sent.clear()
    monkeypatch.delenv("HF_UPDATE_DOWNLOAD_COUNTS", raising=False)
    assert _count(tmp_path)["source"] == "counted"  # both tasks' data loaded, through lm-eval
    assert sent == []


def test_a_user_who_asks_for_download_counts_keeps_them(sent, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_UPDATE_DOWNLOAD_COUNTS", "1")
    assert _count(tmp_path)["source"] == "counted"
    assert len(sent) == 2 and all(url.startswith("HEAD ") and "json" in url for url in sent), sent
