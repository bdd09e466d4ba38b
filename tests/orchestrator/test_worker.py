"""The worker: throttled progress, heartbeats, its own start and end, and its errors."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from evalfleet.orchestrator.states import JobState
from evalfleet.orchestrator.store import JobStore
from evalfleet.orchestrator.worker import (
    ProgressReporter,
    confirm_start,
    describe_error,
    job_output_dir,
    job_request,
    limit_threads,
    run_worker,
)
from evalfleet.types import EvalfleetError, UsageError

DEMAND = {"model": "demo", "work_tokens": 100.0, "tokens_per_s": [10.0], "tp": 2, "pp": 1}


def _request(model: str = "demo", tasks: str = "demo_mc", limit: int = 3) -> dict:
    return {"model": {"path": model}, "tasks": {"names": [tasks], "limit": limit}}


def _placed(store: JobStore, request: dict | None = None, placement=((0, 0),)) -> str:
    job = store.add(request or _request(), priority="normal", max_attempts=3, demand=DEMAND)
    store.transition(job, JobState.PLACED, placement=list(placement))
    return job


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class CountingStore(JobStore):
    def __init__(self, path) -> None:
        super().__init__(path)
        self.writes: list[dict] = []

    def update_progress(self, job_id, **values) -> None:
        self.writes.append(values)
        super().update_progress(job_id, **values)


def test_progress_is_throttled_and_rates_count_only_computed_requests(tmp_path):
    with CountingStore(tmp_path / "jobs.db") as store:
        job = _placed(store)
        clock = Clock()
        with ProgressReporter(store, job, min_interval_s=0.5, heartbeat_s=3600, clock=clock) as report:
            report("loglikelihood", 100, 1000, 0)  # 100 came from the cache
            clock.now += 0.1
            report("loglikelihood", 200, 1000, 5_000)  # too soon: not written
            assert len(store.writes) == 1
            clock.now += 0.5
            report("loglikelihood", 300, 1000, 10_000)
            snapshot = report.snapshot()
            assert (snapshot.done, snapshot.total) == (300, 1000)
            assert snapshot.requests_per_s == pytest.approx(200 / 0.6, rel=1e-3)
            assert snapshot.tokens_per_s == pytest.approx(10_000 / 0.6, rel=1e-3)
            clock.now += 0.1
            report("loglikelihood", 1000, 1000, 40_000)  # a finished phase is always written
            clock.now += 0.1
            report("generate_until", 0, 50, 40_000)
            assert len(store.writes) == 3
        assert len(store.writes) == 4  # the final flush
        record = store.get(job)
        assert (record.done, record.total) == (1000, 1050)
        assert record.requests_per_s == pytest.approx(900 / 0.8, rel=1e-3)
        assert store.writes[0]["tokens_per_s"] is None  # nothing computed yet, no rate to report


def test_progress_says_when_computed_requests_last_moved_and_the_slowest_gap_between_moves(tmp_path):
    """What the scheduler's stall rule reads: requests from the cache are no move, and the time
    to the first computed batch (the model's load) is no batch time."""
    with JobStore(tmp_path / "jobs.db") as store:
        job = _placed(store)
        clock = Clock()
        with ProgressReporter(store, job, min_interval_s=0, heartbeat_s=3600, clock=clock) as report:
            report("loglikelihood", 100, 1000, 0)  # from the cache
            assert store.get(job).progress_at is None
            clock.now += 50.0
            report("loglikelihood", 110, 1000, 500)
            first = store.get(job)
            assert first.progress_at is not None and first.slowest_batch_s is None
            for gap, done in ((2.0, 120), (5.0, 130), (1.0, 140)):
                clock.now += gap
                report("loglikelihood", done, 1000, done * 50)
            moved = store.get(job)
            assert moved.slowest_batch_s == pytest.approx(5.0) and moved.progress_at >= first.progress_at
            clock.now += 30.0
            report("loglikelihood", 140, 1000, 7_000)  # reported again, not moved
            report.flush()  # as the heartbeat thread does while a batch hangs
            still = store.get(job)
            assert (still.progress_at, still.slowest_batch_s) == (moved.progress_at, moved.slowest_batch_s)
            clock.now += 1.0
            report("generate_until", 0, 50, 7_000)  # another kind of request: its batches are unmeasured
            clock.now += 1.0
            report("generate_until", 1, 50, 7_100)
            generating = store.get(job)
            assert generating.slowest_batch_s is None and generating.progress_at >= still.progress_at
            clock.now += 60.0
            report("generate_until", 2, 50, 7_200)
            assert store.get(job).slowest_batch_s == pytest.approx(60.0)


def test_heartbeats_flow_while_nothing_reports(tmp_path):
    with JobStore(tmp_path / "jobs.db") as store:
        job = _placed(store)
        before = store.get(job).heartbeat_at or 0.0
        with ProgressReporter(store, job, heartbeat_s=0.02):
            deadline = time.monotonic() + 10
            while (store.get(job).heartbeat_at or 0.0) <= before and time.monotonic() < deadline:
                time.sleep(0.01)
        assert store.get(job).heartbeat_at > before
        assert store.get(job).done == 0


def test_a_failing_heartbeat_does_not_stop_the_worker(tmp_path, capsys):
    class FlakyStore(JobStore):
        failures = 0

        def heartbeat(self, job_id, now=None):
            if FlakyStore.failures < 2:
                FlakyStore.failures += 1
                raise EvalfleetError("database is locked")
            super().heartbeat(job_id, now)

    with FlakyStore(tmp_path / "jobs.db") as store:
        job = _placed(store)
        with ProgressReporter(store, job, heartbeat_s=0.01):
            deadline = time.monotonic() + 10
            while store.get(job).heartbeat_at is None and time.monotonic() < deadline:
                time.sleep(0.01)
        assert store.get(job).heartbeat_at is not None
    assert "heartbeat failed: database is locked" in capsys.readouterr().err


def test_the_request_gets_its_output_folder_and_the_layout_of_its_devices(tmp_path):
    db = tmp_path / "store" / "jobs.db"
    with JobStore(db) as store:
        one = store.get(_placed(store))
        four = store.get(_placed(store, placement=[(0, 0), (0, 1), (0, 2), (0, 3)]))
    request = job_request(one, db)
    assert Path(request.output_dir) == job_output_dir(db, one.id) == (tmp_path / "store" / "results" / one.id).resolve()
    assert (request.tp, request.pp, request.dp) == (None, None, None)
    wide = job_request(four, db)
    assert (wide.tp, wide.pp, wide.dp) == (2, 1, 2)


def test_confirm_start_moves_placed_to_running_once(tmp_path):
    with JobStore(tmp_path / "jobs.db") as store:
        job = _placed(store)
        record = confirm_start(store, job)
        assert record.state is JobState.RUNNING and record.pid == os.getpid() and record.started_at
        assert confirm_start(store, job).state is JobState.RUNNING
        queued = store.add(_request(), priority="low", max_attempts=3)
        with pytest.raises(UsageError, match="is queued; only placed jobs"):
            confirm_start(store, queued)


def test_one_process_holds_a_job_even_when_its_scheduler_died_before_recording_it(tmp_path):
    import subprocess
    import sys

    import psutil

    from evalfleet.orchestrator.executors.process import SubprocessExecutor

    db = tmp_path / "jobs.db"
    with JobStore(db) as store:
        # The scheduler was killed between starting this worker and attaching it: no pid, no handle.
        orphan = _placed(store)
        record = confirm_start(store, orphan)
        assert record.handle == {"pid": os.getpid(), "create_time": psutil.Process().create_time()}
        adopted = SubprocessExecutor(["true"]).reattach(record)  # what the next scheduler's reconcile does
        assert adopted is not None and adopted.pid == os.getpid()
        # A launch by that next scheduler cannot take the job over.
        assert store.attach(orphan, pid=os.getpid() + 1, handle={"pid": os.getpid() + 1}) is False
        assert store.get(orphan).pid == os.getpid()
        # The other way round: a worker started before the restart finds the job attached to the
        # process the new scheduler launched, and leaves it.
        relaunched = _placed(store)
        assert store.attach(relaunched, pid=os.getpid(), handle={"pid": os.getpid()})
    late = subprocess.run(
        [sys.executable, "-c", "import sys; from evalfleet.orchestrator.store import JobStore;"
         "from evalfleet.orchestrator.worker import confirm_start; from evalfleet.types import UsageError\n"
         f"try:\n    confirm_start(JobStore({str(db)!r}), {relaunched!r})\n"
         "except UsageError as error:\n    sys.exit(str(error))"],
        capture_output=True, text=True, timeout=120,
    )
    assert late.returncode == 1 and f"is held by process {os.getpid()}" in late.stderr, late.stderr
    with JobStore(db) as store:
        assert store.get(relaunched).state is JobState.PLACED and store.get(relaunched).pid == os.getpid()


def test_limit_threads_follows_the_executor(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("EVALFLEET_THREADS", "1")
    try:
        limit_threads()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_worker_runs_its_job_to_a_result(tmp_path):
    db = tmp_path / "jobs.db"
    with JobStore(db) as store:
        job = _placed(store)
    result = run_worker(job, db, heartbeat_s=0.2)
    with JobStore(db) as store:
        record = store.get(job)
        events = store.events(job)
    assert record.state is JobState.SUCCEEDED and record.result_path == result.output_path
    assert Path(record.result_path) == job_output_dir(db, job) / "results.json"
    document = json.loads(Path(record.result_path).read_text())
    assert document["results"]["demo_mc"]["acc,none"] >= 0 and document["evalfleet"]["cache"]["computed"] > 0
    assert record.done == record.total == document["evalfleet"]["timing"]["token_requests"]
    assert record.tokens_per_s > 0 and record.requests_per_s > 0
    assert [e.to_state for e in events][-2:] == [JobState.RUNNING, JobState.SUCCEEDED]
    assert "computed" in events[-1].reason


def test_a_worker_records_its_error_and_leaves_the_decision_to_the_scheduler(tmp_path):
    db = tmp_path / "jobs.db"
    with JobStore(db) as store:
        missing = _placed(store, _request(model=str(tmp_path / "no-such-model")))
    with pytest.raises(EvalfleetError) as caught:
        run_worker(missing, db)
    with JobStore(db) as store:
        record = store.get(missing)
    assert record.state is JobState.RUNNING and record.error == str(caught.value)
    assert "no-such-model" in record.error


def test_an_unexpected_exception_becomes_one_sentence(tmp_path, capsys, monkeypatch):
    def planted_bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")  # a bug in evalfleet, not the user's fault

    monkeypatch.setattr("evalfleet.runtime.backends.hf.HFBackend.load", planted_bug)
    db = tmp_path / "jobs.db"
    with JobStore(db) as store:
        job = _placed(store, _request())
    with pytest.raises(EvalfleetError) as caught:
        run_worker(job, db)
    with JobStore(db) as store:
        error = store.get(job).error
    assert error == str(caught.value) == "ZeroDivisionError: division by zero"
    assert "Traceback" in capsys.readouterr().err


def test_errors_are_described_in_one_line():
    assert describe_error(UsageError("unknown task 'x'")) == "unknown task 'x'"
    assert describe_error(RuntimeError("CUDA error\nmore detail")) == "RuntimeError: CUDA error"
    assert describe_error(KeyError()) == "KeyError"
