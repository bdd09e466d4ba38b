"""A package that is not installed is one sentence that says how to get it, never a traceback."""

from __future__ import annotations

import importlib
import sys

from clitools import run_main


def _import(name: str):
    def command(*args, **kwargs):
        importlib.import_module(name)  # a real failed import, as a command that needs the package meets it

    return command


def test_a_missing_optional_package_names_its_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # the import fails as where ray is not installed
    monkeypatch.setattr("evalfleet.orchestrator.pool_status.pool_status", _import("ray"))
    code, out, err = run_main(["pool", "--db", str(tmp_path / "jobs.db")], capsys, monkeypatch)
    assert code == 1 and out == ""
    assert err == "error: this needs the optional package 'ray'; install it with: pip install 'evalfleet[ray]'\n"


def test_a_missing_core_package_asks_for_a_reinstall(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("evalfleet.orchestrator.pool_status.pool_status", _import("no_such_package_x"))
    code, _, err = run_main(["pool", "--db", str(tmp_path / "jobs.db")], capsys, monkeypatch)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "'no_such_package_x' is missing from this installation; reinstall evalfleet" in err
