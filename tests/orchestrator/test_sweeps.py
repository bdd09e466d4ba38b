"""Sweeps: a matrix of models × task sets × settings as one group of jobs (`evalfleet sweep`), its
`status GROUP` and `cancel GROUP`, and re-submission that skips every cell already covered."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from clitools import run_main
from fleet import fleet_in, wait_for

from evalfleet.orchestrator import JobState, JobStore
from evalfleet.orchestrator.sweeps import expand_models
from evalfleet.types import DEMO_MODEL_DIR


def _sweep_file(folder: Path, **spec) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def evalfleet(capsys, monkeypatch):
    return lambda *args: run_main(list(args), capsys, monkeypatch)


def test_globs_expand_to_folders_in_natural_step_order(tmp_path):
    for name in ("step-10", "step-2", "step-1", "step-100", "other"):
        (tmp_path / "ckpts" / name).mkdir(parents=True)
    (tmp_path / "ckpts" / "step-3.log").write_text("not a model")
    models = expand_models([str(tmp_path / "ckpts" / "step-*"), "demo"])
    assert models == [str(tmp_path / "ckpts" / f"step-{n}") for n in (1, 2, 10, 100)] + ["demo"]


def test_a_bad_sweep_file_is_one_sentence_and_exit_2(tmp_path, evalfleet):
    unknown = _sweep_file(tmp_path, models=["demo"], tasks=["demo_mc"], settings=[{"num_fewshots": 1}])
    code, out, err = evalfleet("sweep", str(unknown))
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "unknown key 'settings.0.num_fewshots'" in err and "num_fewshot" in err.split("takes")[1]

    nothing = _sweep_file(tmp_path, models=[str(tmp_path / "ckpts" / "step-*")], tasks=["demo_mc"])
    code, out, err = evalfleet("sweep", str(nothing))
    assert code == 2 and err.count("\n") == 1 and "matches no folder" in err, err

    bad_value = _sweep_file(tmp_path, models=["demo"], tasks=["demo_mc"], settings=[{"num_fewshot": -1}])
    code, _, err = evalfleet("sweep", str(bad_value))
    assert code == 2 and err.count("\n") == 1 and "demo × demo_mc" in err and "num_fewshot" in err, err
    with JobStore(tmp_path / "jobs.sqlite") as store:  # nothing was submitted
        assert store.list() == [] and store.groups() == []


def test_queued_cells_are_skipped_and_cancel_group_cancels_its_jobs_only(tmp_path, evalfleet):
    sweep = _sweep_file(tmp_path, name="queued", models=["demo"], tasks=["demo_arith"], limit=2,
                        settings=[{"num_fewshot": 0}, {"num_fewshot": 1}])
    code, out, err = evalfleet("sweep", str(sweep), "--pool", "cpu", "--json")
    assert code == 0, err
    group = json.loads(out)["group"]
    code, out, err = evalfleet("sweep", str(sweep), "--pool", "cpu")  # queued jobs cover their cells
    assert code == 0 and out.strip().startswith(f"group {group}: 0 submitted, 2 skipped"), out
    code, out, err = evalfleet("submit", "--model", "demo", "--tasks", "demo_mc", "--limit", "2", "--pool", "cpu")
    outsider = out.strip()

    code, out, err = evalfleet("cancel", group)
    assert code == 0 and f"group {group}: 2 jobs cancelled" in err, err
    with JobStore(tmp_path / "jobs.sqlite") as store:
        assert [r.state for r in store.jobs_in_group(group)] == [JobState.CANCELLED] * 2
        assert store.get(outsider).state is JobState.QUEUED
    code, _, err = evalfleet("cancel", group)
    assert code == 2 and err.count("\n") == 1 and "has no unfinished job (2 jobs: 2 cancelled)" in err

    # Cancelled jobs cover nothing: the same sweep submits both cells again, into its group.
    code, out, err = evalfleet("sweep", str(sweep), "--pool", "cpu")
    assert code == 0 and out.strip().startswith(f"group {group}: 2 submitted, 0 skipped"), out


@pytest.mark.slow
def test_a_sweep_runs_every_cell_and_resubmitting_it_starts_none(tmp_path, tiny_model):
    """2 models (one through a glob) × 2 task sets × 2 few-shot settings: 8 jobs through a real scheduler."""
    shutil.copytree(DEMO_MODEL_DIR, tmp_path / "ckpts" / "step-1")
    sweep = _sweep_file(tmp_path, name="fewshot", models=[str(tmp_path / "ckpts" / "step-*"), str(tiny_model)],
                        tasks=[["demo_mc"], "demo_arith"], settings=[{"num_fewshot": 0}, {"num_fewshot": 1}],
                        limit=2)
    with fleet_in(tmp_path) as fleet:
        fleet.start("--slots", "8", "--interval", "0.2")
        first = json.loads(fleet.cli("sweep", str(sweep), "--json").stdout)
        group = first["group"]
        assert len(first["submitted"]) == 8 and first["skipped"] == []

        def finished():
            with JobStore(fleet.db) as store:
                records = store.jobs_in_group(group)
            failed = [r for r in records if r.state is not JobState.SUCCEEDED and r.state.terminal]
            assert not failed, (failed[0].error, fleet.log.read_text())
            return all(r.state is JobState.SUCCEEDED for r in records) and records

        records = wait_for(finished, 240, "the sweep's 8 jobs to succeed", interval=0.5)
        for cell in first["submitted"]:  # each job ran its own cell's settings
            record = next(r for r in records if r.id == cell["job"])
            results = json.loads(Path(record.result_path).read_text())
            assert set(results["n-shot"]) == set(cell["tasks"])
            assert all(shots == cell["options"]["num_fewshot"] for shots in results["n-shot"].values())
            assert Path(record.request["model"]["path"]) == Path(cell["model"]).resolve()

        again = fleet.cli("sweep", str(sweep))
        assert again.stdout.startswith(f"group {group}: 0 submitted, 8 skipped"), again.stdout
        with JobStore(fleet.db) as store:
            assert len(store.list()) == 8

        status = json.loads(fleet.cli("status", group, "--json").stdout)
        assert status["summary"]["by_state"] == {"succeeded": 8} and len(status["jobs"]) == 8
        table = fleet.cli("status", group).stdout
        assert "8 jobs: 8 succeeded" in table and all(r.id in table for r in records)
