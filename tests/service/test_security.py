"""Tokens (file, variable, created 0600), the loopback rule, and the allowed model roots."""

from __future__ import annotations

import stat

import pytest
from clitools import run_main
from conftest import TOKEN

from evalfleet.service.security import ModelRoots, check_host, is_loopback, resolve_token
from evalfleet.types import EvaluationRequest, UsageError

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_token_sources_in_order(tmp_path, monkeypatch):
    monkeypatch.delenv("EVALFLEET_TOKEN", raising=False)
    created = resolve_token(None, create_at=tmp_path / "data" / "service-token")
    assert created.created and len(created.value) >= 32
    assert stat.S_IMODE((tmp_path / "data" / "service-token").stat().st_mode) == 0o600
    again = resolve_token(None, create_at=tmp_path / "data" / "service-token")
    assert again.value == created.value and not again.created

    monkeypatch.setenv("EVALFLEET_TOKEN", "from-the-environment-123")
    assert resolve_token(None, create_at=tmp_path / "unused").value == "from-the-environment-123"
    (tmp_path / "file").write_text("from-the-file-0123456789\n")
    assert resolve_token(str(tmp_path / "file")).value == "from-the-file-0123456789"

    (tmp_path / "short").write_text("abc")
    with pytest.raises(UsageError, match="shorter than 16"):
        resolve_token(str(tmp_path / "short"))
    with pytest.raises(UsageError, match="no token file"):
        resolve_token(str(tmp_path / "missing"))


def test_only_loopback_without_a_chosen_token(tmp_path, monkeypatch):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("no-such-host.invalid")
    created = resolve_token(None, create_at=tmp_path / "t")
    check_host("127.0.0.1", created)
    with pytest.raises(UsageError, match="reachable from other machines"):
        check_host("0.0.0.0", created)
    (tmp_path / "chosen").write_text(TOKEN)
    check_host("0.0.0.0", resolve_token(str(tmp_path / "chosen")))


def test_serve_refuses_bad_options_with_one_sentence(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EVALFLEET_TOKEN", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    cases = [
        (["serve", "--host", "0.0.0.0"], "--host 0.0.0.0 is reachable from other machines"),
        (["serve", "--slots", "1", "--gpus", "cpu"], "use one of --slots, --gpus or --ray, not --slots and --gpus"),
        (["serve", "--ray", "auto"], "--ray needs the Ray executor"),
        (["serve", "--model-root", str(tmp_path / "nope")], "is not a folder"),
    ]
    for args, message in cases:
        code, out, err = run_main([*args, "--db", str(tmp_path / "jobs.db")], capsys, monkeypatch)
        assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)


def _request(path: str, include: str | None = None, **model) -> EvaluationRequest:
    return EvaluationRequest.model_validate({"model": {"path": path, **model},
                                             "tasks": {"names": "demo_mc", "include_path": include}})


def test_model_roots(tmp_path):
    (tmp_path / "models" / "m").mkdir(parents=True)
    roots = ModelRoots([str(tmp_path / "models")])
    roots.check(_request("demo"))
    roots.check(_request(str(tmp_path / "models" / "m")))
    for outside in (str(tmp_path), str(tmp_path / "models" / ".." / "elsewhere"), "/etc", "gpt2"):
        with pytest.raises(Exception, match="outside the allowed model roots"):
            roots.check(_request(outside))
    with pytest.raises(Exception, match="task folder .* outside"):
        roots.check(_request("demo", include="/tmp"))
    with pytest.raises(Exception, match="trust_remote_code"):
        roots.check(_request("demo", trust_remote_code=True))


def test_api_refuses_models_outside_the_roots(client, tmp_path):
    response = client.post("/api/v1/jobs", json={"model": str(tmp_path), "tasks": ["demo_mc"]}, headers=AUTH)
    assert response.status_code == 403 and "outside the allowed model roots" in response.json()["detail"]
    bad = client.post("/api/v1/jobs", json={"model": "demo", "limit": 0}, headers=AUTH)
    assert bad.status_code == 422 and bad.json() == {"detail": "invalid value for 'tasks.limit': Input should be greater than 0"}
    unknown = client.post("/api/v1/jobs", json={"model": "demo", "output_dir": "/etc"}, headers=AUTH)
    assert unknown.status_code == 422 and "output_dir" in unknown.json()["detail"]
    assert client.get("/api/v1/jobs?limit=500", headers=AUTH).status_code == 422
    assert client.get("/api/v1/jobs", headers=AUTH).json() == {"total": 0, "offset": 0, "limit": 50, "jobs": []}
