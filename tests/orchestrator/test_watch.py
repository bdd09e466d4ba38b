"""`evalfleet watch`: a test trainer writes checkpoints (the bundled demo model's files) under a folder
while a real watcher subprocess and a real scheduler evaluate each once it is whole; both are killed
and restarted on the way, one checkpoint is rewritten while it is evaluated; `serve --watch` keeps
its watcher alive and lists it at /api/v1/watches."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from clitools import evalfleet_command, run_main, run_subprocess
from fleet import fleet_in, wait_for

from evalfleet.orchestrator import JobState, JobStore
from evalfleet.orchestrator.checkpoints import checkpoint_step, completeness, fingerprint, missing_for_loading
from evalfleet.orchestrator.watcher import Watcher, WatchSpec, find_or_create_watch
from evalfleet.types import DEMO_MODEL_DIR, EvaluationRequest

WATCH_FLAGS = ("--tasks", "demo_mc", "--limit", "2", "--every", "0.2", "--quiet-for", "1")
MODEL_FILES = sorted(p.name for p in DEMO_MODEL_DIR.iterdir())


class Trainer:
    """Writes checkpoints as trainers do, and remembers when it last wrote into each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.last_write: dict[int, float] = {}

    def _done(self, step: int) -> None:
        folder = self.root / f"step-{step}"
        self.last_write[step] = max(p.stat().st_mtime for p in [folder, *folder.iterdir()])

    def fast(self, step: int, marker: bool = False) -> None:
        """save_pretrained into a hidden folder, then one rename (and a marker, like some trainers)."""
        scratch = self.root / f".tmp-step-{step}"
        shutil.copytree(DEMO_MODEL_DIR, scratch, copy_function=shutil.copyfile)
        scratch.rename(self.root / f"step-{step}")
        if marker:
            (self.root / f"step-{step}" / ".complete").touch()
        self._done(step)

    def slow(self, step: int, pause_s: float = 0.5) -> None:
        """File by file in place, weights last and in two halves, pausing between writes; no marker."""
        folder = self.root / f"step-{step}"
        folder.mkdir()
        for name in MODEL_FILES:
            data = (DEMO_MODEL_DIR / name).read_bytes()
            with open(folder / name, "wb") as out:
                out.write(data[:len(data) // 2])
                out.flush()
                time.sleep(pause_s)
                out.write(data[len(data) // 2:])
        self._done(step)

    def rewrite(self, step: int) -> None:
        shutil.copyfile(DEMO_MODEL_DIR / "model.safetensors", self.root / f"step-{step}" / "model.safetensors")
        self._done(step)


def _checkpoint(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        shutil.copyfile(DEMO_MODEL_DIR / name, folder / name)
    return folder


# units -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "pattern", "step"), [
    ("step-1000", None, 1000), ("step_1000", None, 1000), ("checkpoint-1000", None, 1000),
    ("iter_0001000", None, 1000), ("global_step1000", None, 1000), ("run3-step-20", None, 20),
    ("step-1000.tmp", None, None), ("final", None, None), ("steps", None, None),
    ("ep2-s300", r"-s(\d+)$", 300), ("ep2-s300", r"^ep(\d+)", 2), ("step-1000", r"-s(\d+)$", None),
])
def test_checkpoint_step_reads_the_step_from_a_folder_name(name, pattern, step):
    assert checkpoint_step(Path("/runs") / name, pattern) == step


def test_a_marker_or_a_quiet_loadable_folder_is_complete_and_a_half_written_one_is_not(tmp_path):
    whole = _checkpoint(tmp_path / "step-1", *MODEL_FILES)
    assert completeness(whole, marker=None, unchanged_s=2, quiet_s=2).complete
    assert not completeness(whole, marker=None, unchanged_s=1, quiet_s=2).complete  # still changing
    assert not completeness(whole, marker="READY", unchanged_s=60, quiet_s=2).complete  # --marker: only it counts
    (whole / "READY").touch()
    assert completeness(whole, marker="READY", unchanged_s=0, quiet_s=2).why == "marker READY"
    assert not completeness(whole, marker="READY", unchanged_s=0, quiet_s=2, rewritten=True).complete

    half = _checkpoint(tmp_path / "step-2", "config.json", "tokenizer.json")
    assert missing_for_loading(half) == "no weights yet"
    data = (DEMO_MODEL_DIR / "model.safetensors").read_bytes()
    (half / "model.safetensors").write_bytes(data[: len(data) - 100])  # the last bytes not written yet
    verdict = completeness(half, marker=None, unchanged_s=600, quiet_s=2)
    assert (verdict.complete, verdict.why) == (False, "model.safetensors is not whole yet")
    (half / "done").touch()  # a trainer's marker is believed
    assert completeness(half, marker=None, unchanged_s=0, quiet_s=2).why == "marker done"

    sharded = _checkpoint(tmp_path / "step-3", "config.json")
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    shutil.copyfile(DEMO_MODEL_DIR / "model.safetensors", sharded / "model-00001-of-00002.safetensors")
    assert missing_for_loading(sharded) == "shard model-00002-of-00002.safetensors not written yet"


def test_the_fingerprint_follows_the_model_files_only(tmp_path):
    folder = _checkpoint(tmp_path / "step-1", *MODEL_FILES)
    before = fingerprint(folder)
    (folder / ".complete").touch()
    (folder / "optimizer.pt").write_bytes(b"state")
    assert fingerprint(folder) == before
    time.sleep(0.01)
    shutil.copyfile(DEMO_MODEL_DIR / "model.safetensors", folder / "model.safetensors")
    assert fingerprint(folder) != before
    shutil.rmtree(folder)
    assert fingerprint(folder) is None


def test_a_checkpoint_deleted_before_its_evaluation_is_reported(tmp_path):
    root = tmp_path / "ckpts"
    half = _checkpoint(root / "step-1", "config.json")
    request = EvaluationRequest.model_validate({"model": {"path": "demo"}, "tasks": {"names": "demo_mc", "limit": 2}})
    spec = WatchSpec.of(str(root), request, quiet_s=1.0)
    lines: list[str] = []
    with JobStore(tmp_path / "jobs.db") as store:
        watcher = Watcher(store, str(tmp_path / "jobs.db"), spec, find_or_create_watch(store, spec), lines.append)
        assert watcher.poll() == 1  # waiting for its weights
        shutil.rmtree(half)
        assert watcher.poll() == 0
        [row] = store.checkpoints(watcher.watch_id)
        assert (row.step, row.state, row.job_id) == (1, "deleted", None)
        assert find_or_create_watch(store, spec) == watcher.watch_id  # the same spec finds its watch again
    assert lines == ["found step 1 (step-1): waiting until it is complete (files changed 0.0s ago, 1s of quiet needed)",
                     "step 1 (step-1) was deleted before its evaluation"]


# the real thing ----------------------------------------------------------------------------------


def _start_watcher(root: Path, db: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([*evalfleet_command(), "watch", str(root), *WATCH_FLAGS, "--db", str(db)],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _rows(db: Path) -> dict[int, object]:
    with JobStore(db) as store:
        watches = store.groups("watch")
        return {row.step: row for row in store.checkpoints(watches[0].id)} if watches else {}


def _jobs_by_step(db: Path) -> dict[int, list]:
    with JobStore(db) as store:
        jobs = store.jobs_in_group(store.groups("watch")[0].id)
    by_step: dict[int, list] = {}
    for job in jobs:
        by_step.setdefault(checkpoint_step(job.request["model"]["path"]), []).append(job)
    return by_step


@pytest.mark.slow
def test_each_checkpoint_is_evaluated_once_when_complete_through_restarts_and_again_when_rewritten(tmp_path):
    root = tmp_path / "ckpts"
    root.mkdir()
    trainer = Trainer(root)
    with fleet_in(tmp_path) as fleet:
        trainer.fast(100, marker=True)  # before the watcher starts: it is submitted on the first look
        logs = [tmp_path / "watch-1.log", tmp_path / "watch-2.log"]
        watcher = _start_watcher(root, fleet.db, logs[0])
        try:
            fleet.start("--slots", "2", "--interval", "0.2")  # starts while the watcher counts the first job
            wait_for(lambda: _rows(fleet.db).get(100) and _rows(fleet.db)[100].job_id, 180, "step 100's job")

            slow = threading.Thread(target=trainer.slow, args=(200,))
            slow.start()
            wait_for(lambda: 200 in _rows(fleet.db), 60, "the watcher to see step 200 being written")
            watcher.send_signal(signal.SIGKILL)  # mid-write, and maybe mid-evaluation of step 100
            watcher.wait()
            watcher = _start_watcher(root, fleet.db, logs[1])
            slow.join()
            wait_for(lambda: _rows(fleet.db)[200].job_id, 180, "step 200's job")

            wait_for(lambda: _rows(fleet.db)[100].state == _rows(fleet.db)[200].state == "evaluated", 240,
                     "steps 100 and 200 to be evaluated", interval=0.3)
            assert fleet.stop() == 0  # the scheduler: step 300 is submitted while none runs, and runs on the next
            trainer.fast(300)
            wait_for(lambda: _rows(fleet.db).get(300) and _rows(fleet.db)[300].job_id, 180, "step 300's job")
            trainer.rewrite(300)  # while its job is in flight (queued, then run by the next scheduler)
            fleet.start("--slots", "2", "--interval", "0.2")

            wait_for(lambda: [row.state for row in _rows(fleet.db).values()] == ["evaluated"] * 3
                     and _rows(fleet.db)[300].evaluations == 2, 240, "every checkpoint to be evaluated", interval=0.3)
        finally:
            watcher.send_signal(signal.SIGKILL)
            watcher.wait()

        jobs = _jobs_by_step(fleet.db)
        assert {step: len(listed) for step, listed in jobs.items()} == {100: 1, 200: 1, 300: 2}
        assert all(job.state is JobState.SUCCEEDED for listed in jobs.values() for job in listed)
        for step in (100, 200):
            assert jobs[step][0].submitted_at > trainer.last_write[step]
        assert jobs[300][0].submitted_at < trainer.last_write[300] < jobs[300][1].submitted_at
        text = logs[0].read_text() + logs[1].read_text()
        assert f"found step 100 (step-100) complete (marker .complete) -> job {jobs[100][0].id}" in text
        assert re.search(rf"found step 200 \(step-200\) complete \(unchanged for 1s .*\) -> job {jobs[200][0].id}",
                         text), text
        assert f"step 300 (step-300) changed while job {jobs[300][0].id} evaluated it" in text
        assert "re-evaluating step 300 (step-300) complete" in text

        again = run_subprocess(["watch", str(root), *WATCH_FLAGS, "--once", "--db", str(fleet.db)], timeout=120)
        assert again.returncode == 0, again.stderr
        for step in (100, 200, 300):
            assert f"step {step} (step-{step}): skipped, already evaluated" in again.stdout
        assert {step: len(listed) for step, listed in _jobs_by_step(fleet.db).items()} == {100: 1, 200: 1, 300: 2}
        shown = run_subprocess(["watch", str(root), "--status", "--json", "--db", str(fleet.db)], timeout=60)
        [watch] = json.loads(shown.stdout)
        assert [(c["step"], c["state"], c["job_state"]) for c in watch["checkpoints"]] == [
            (100, "evaluated", "succeeded"), (200, "evaluated", "succeeded"), (300, "evaluated", "succeeded")]


@pytest.mark.slow
def test_serve_keeps_its_watcher_alive_and_lists_its_watches(tmp_path):
    root = tmp_path / "ckpts"
    root.mkdir()
    token = "watch-token-0123456789abcdef0123"
    (tmp_path / "token").write_text(token)
    db, log = tmp_path / "jobs.db", tmp_path / "serve.log"
    command = [*evalfleet_command(), "serve", "--port", "0", "--db", str(db), "--token-file", str(tmp_path / "token"),
               "--watch", str(root), "--watch-tasks", "demo_mc", "--watch-options", "--limit 2 --every 0.3 --quiet-for 1"]
    with open(log, "ab") as out:
        serve = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        found = wait_for(lambda: re.search(r"on (http://127\.0\.0\.1:\d+)/", log.read_text()) or serve.poll() is not None,
                         120, "the service to start")
        assert serve.poll() is None, log.read_text()
        with httpx.Client(base_url=found.group(1), headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
            def watch() -> dict:
                [only] = client.get("/api/v1/watches").json()
                return only

            Trainer(root).fast(1, marker=True)
            first = wait_for(lambda: (w := watch())["checkpoints"] and w["checkpoints"][0]["job_id"] and w, 180,
                             "the checkpoint's job")
            assert (first["folder"], first["tasks"]) == (str(root.resolve()), ["demo_mc"])
            [checkpoint] = first["checkpoints"]
            assert (checkpoint["step"], checkpoint["state"], checkpoint["job_state"]) == (1, "submitted", "queued")
            os.kill(first["watcher"]["pid"], signal.SIGKILL)
            back = wait_for(lambda: (w := watch())["watcher"]["pid"] != first["watcher"]["pid"] and w, 120,
                            "the watcher to be restarted")
            assert back["checkpoints"][0]["job_id"] == checkpoint["job_id"]  # not submitted again
            shutil.rmtree(root / "step-1")  # before its evaluation: no scheduler here, the job waits in the queue
            gone = wait_for(lambda: (c := watch()["checkpoints"][0])["state"] == "deleted" and c, 60, "the deletion")
            assert gone["job_state"] == "cancelled"
            assert gone["note"] == f"deleted during its evaluation by job {checkpoint['job_id']} (queued); cancelled it"
        with JobStore(db) as store:
            assert len(store.jobs_in_group(first["id"])) == 1
        text = log.read_text()
        assert "exited with code -9; restarting it in 1 s" in text
        assert "step 1 (step-1) was deleted during its evaluation" in text
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0, log.read_text()
    finally:
        if serve.poll() is None:  # a failed test: leave neither serve nor its watcher behind
            children = psutil.Process(serve.pid).children(recursive=True)
            serve.kill()
            serve.wait()
            for child in children:
                with contextlib.suppress(psutil.Error):
                    child.kill()


def test_bad_watch_input_gets_one_sentence(tmp_path, capsys, monkeypatch):
    (tmp_path / "token").write_text("watch-token-0123456789abcdef0123")
    cases = [
        (["watch", str(tmp_path / "nowhere"), "--tasks", "demo_mc"], "is not a folder"),
        (["watch", str(tmp_path)], "--tasks is required"),
        (["watch", str(tmp_path), "--tasks", "demo_mc", "--step-regex", "step-\\d+"], "must have exactly one group"),
        (["watch", str(tmp_path / "nowhere"), "--status"], "has no watch in"),
        (["serve", "--port", "0", "--token-file", str(tmp_path / "token"), "--watch", str(tmp_path)],
         "--watch needs --watch-tasks"),
    ]
    for args, sentence in cases:
        code, _, err = run_main([*args, "--db", str(tmp_path / "jobs.db")], capsys, monkeypatch)
        assert code != 0 and sentence in err and len(err.strip().splitlines()) == 1, (args, err)
