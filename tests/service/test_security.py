"""Tokens (file, variable, created 0600), the loopback rule, and the allowed model roots."""

from __future__ import annotations

import socket
import stat

import pytest
from clitools import run_main
from conftest import TOKEN

from evalfleet.service.security import Forbidden, ModelRoots, check_host, is_loopback, resolve_token
from evalfleet.types import EvaluationRequest, UsageError

AUTH = {"Authorization": f"Bearer {TOKEN}"}
LONG_TOKEN = "a-token-of-the-operators-own-choosing-0123"


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


def test_only_loopback_without_a_chosen_long_token(tmp_path, monkeypatch):
    monkeypatch.delenv("EVALFLEET_TOKEN", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("no-such-host.invalid")
    created = resolve_token(None, create_at=tmp_path / "t")
    check_host("127.0.0.1", created)
    check_host("127.0.0.1", resolve_token(str(tmp_path / "t")))  # loopback: 16 characters or more will do
    with pytest.raises(UsageError, match="reachable from other machines: give a token with --token-file"):
        check_host("0.0.0.0", created)
    second_start = resolve_token(None, create_at=tmp_path / "t")  # the file the first start created
    assert not second_start.created
    with pytest.raises(UsageError, match="reachable from other machines: give a token with --token-file"):
        check_host("0.0.0.0", second_start)
    (tmp_path / "chosen").write_text(TOKEN)  # 27 characters
    with pytest.raises(UsageError, match="must be at least 32 characters"):
        check_host("0.0.0.0", resolve_token(str(tmp_path / "chosen")))
    (tmp_path / "long").write_text(LONG_TOKEN)
    check_host("0.0.0.0", resolve_token(str(tmp_path / "long")))
    monkeypatch.setenv("EVALFLEET_TOKEN", LONG_TOKEN)
    check_host("0.0.0.0", resolve_token(None, create_at=tmp_path / "t"))


def test_serve_refuses_bad_options_with_one_sentence(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EVALFLEET_TOKEN", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    cases = [
        (["serve", "--host", "0.0.0.0"], "--host 0.0.0.0 is reachable from other machines"),
        (["serve", "--host", "0.0.0.0"], "--host 0.0.0.0 is reachable from other machines"),  # its token file exists now
        (["serve", "--forwarded-allow-ips", "10.0.0.1,proxy.example"], "--forwarded-allow-ips: 'proxy.example' is"),
        (["serve", "--slots", "1", "--gpus", "cpu"], "use one of --slots, --gpus or --ray, not --slots and --gpus"),
        (["serve", "--model-root", str(tmp_path / "nope")], "is not a folder"),
    ]
    for args, message in cases:
        code, out, err = run_main([*args, "--db", str(tmp_path / "jobs.db")], capsys, monkeypatch)
        assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
    code, out, err = run_main(["serve", "--ray", address, "--db", str(tmp_path / "jobs.db")], capsys, monkeypatch)
    assert (code, err) == (1, f"error: cannot reach the Ray cluster at '{address}': Connection refused\n")


def test_serve_passes_a_reachable_ray_address_to_its_scheduler(tmp_path):
    from evalfleet.service.serve import ServeOptions, scheduler_arguments

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        command = scheduler_arguments(ServeOptions(ray=address), tmp_path / "jobs.db")
    assert command[3:8] == ["scheduler", "--db", str(tmp_path / "jobs.db"), "--ray", address]


def _request(path: str, include: str | None = None, **model) -> EvaluationRequest:
    return EvaluationRequest.model_validate({"model": {"path": path, **model},
                                             "tasks": {"names": "demo_mc", "include_path": include}})


def test_model_roots(tmp_path):
    (tmp_path / "models" / "m").mkdir(parents=True)
    roots = ModelRoots([str(tmp_path / "models")])
    assert roots.admit(_request("demo")).model.path == "demo"
    assert roots.admit(_request(str(tmp_path / "models" / "m"))).model.path == str(tmp_path / "models" / "m")
    for outside in (str(tmp_path), str(tmp_path / "models" / ".." / "elsewhere"), "/etc"):
        with pytest.raises(Forbidden, match="outside the allowed model roots"):
            roots.admit(_request(outside))
    with pytest.raises(Forbidden, match="trust_remote_code"):
        roots.admit(_request("demo", trust_remote_code=True))


def test_model_paths_are_resolved_once_strictly(tmp_path, monkeypatch):
    models = tmp_path / "models"
    (models / "real").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (models / "link").symlink_to(models / "real")
    (models / "escape").symlink_to(tmp_path / "secret")
    (models / "file.bin").write_text("x")
    roots = ModelRoots([str(models)])
    assert roots.admit(_request(str(models / "link"))).model.path == str(models / "real")  # stored as resolved
    refusals = {
        str(models / "escape"): "leads outside the allowed model roots",
        str(models / "missing"): "does not exist on the server",
        str(models / "file.bin"): "is not a folder",
        "real": "hub ids are accepted only when the service runs with --allow-hub",
        "./real": "hub ids are accepted only",
        "org/model": "hub ids are accepted only",
    }
    monkeypatch.chdir(models)  # the service's working folder inside a root: relative names must not pass
    for path, message in refusals.items():
        with pytest.raises(Forbidden, match=message):
            roots.admit(_request(path))

    hub = ModelRoots([str(models)], allow_hub=True)
    assert hub.admit(_request("org/model")).model.path == "org/model"
    assert hub.admit(_request("gpt2")).model.path == "gpt2"
    with pytest.raises(Forbidden, match="names both a hub id and a folder of the server's"):
        hub.admit(_request("real"))  # a folder of that name beside the service would be loaded instead
    for path in ("../secret", "./real", "~/x", str(models / "escape")):
        with pytest.raises(Forbidden):
            hub.admit(_request(path))


def test_api_refuses_models_outside_the_roots(client, tmp_path):
    response = client.post("/api/v1/jobs", json={"model": str(tmp_path), "tasks": ["demo_mc"]}, headers=AUTH)
    assert response.status_code == 403 and "outside the allowed model roots" in response.json()["detail"]
    bad = client.post("/api/v1/jobs", json={"model": "demo", "limit": 0}, headers=AUTH)
    assert bad.status_code == 422 and bad.json() == {"detail": "invalid value for 'tasks.limit': Input should be greater than 0"}
    unknown = client.post("/api/v1/jobs", json={"model": "demo", "output_dir": "/etc"}, headers=AUTH)
    assert unknown.status_code == 422 and "output_dir" in unknown.json()["detail"]
    assert client.get("/api/v1/jobs?limit=500", headers=AUTH).status_code == 422
    assert client.get("/api/v1/jobs", headers=AUTH).json() == {"total": 0, "offset": 0, "limit": 50, "jobs": []}
