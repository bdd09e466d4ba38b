"""The job store: its state machine, history, restart survival and concurrent writers."""

from __future__ import annotations

import contextlib
import multiprocessing
import sqlite3

import pytest

from evalfleet.orchestrator.states import TRANSITIONS, IllegalTransition, JobState
from evalfleet.orchestrator.store import SCHEMA_VERSION, JobStore, resolve_db_path
from evalfleet.types import EvalfleetError, UsageError

REQUEST = {"model": {"path": "demo"}, "tasks": {"names": ["demo_mc"]}}


def _add(store: JobStore, **kwargs) -> str:
    return store.add(REQUEST, priority=kwargs.pop("priority", "normal"), max_attempts=3, **kwargs)


def test_happy_path_records_every_change(tmp_path):
    with JobStore(tmp_path / "jobs.db") as store:
        job = _add(store, now=1.0)
        store.transition(job, JobState.PLACED, placement=[(0, 1), (0, 2)], now=2.0)
        store.transition(job, JobState.RUNNING, pid=123, started_at=3.0, now=3.0)
        store.update_progress(job, done=5, total=10, tokens_per_s=99.5, now=4.0)
        record = store.transition(job, JobState.SUCCEEDED, result_path="out/results.json", now=5.0)
        assert record.state is JobState.SUCCEEDED
        assert record.placement == [(0, 1), (0, 2)]
        assert (record.done, record.total, record.tokens_per_s, record.heartbeat_at) == (5, 10, 99.5, 4.0)
        assert record.finished_at == 5.0 and record.result_path == "out/results.json"
        assert [(e.from_state, e.to_state) for e in store.events(job)] == [
            (None, JobState.QUEUED),
            (JobState.QUEUED, JobState.PLACED),
            (JobState.PLACED, JobState.RUNNING),
            (JobState.RUNNING, JobState.SUCCEEDED),
        ]


@pytest.mark.parametrize("source", list(JobState))
@pytest.mark.parametrize("target", list(JobState))
def test_every_pair_follows_the_table(tmp_path, source, target):
    paths = {  # how to reach each state legally from queued
        JobState.QUEUED: [],
        JobState.PLACED: [JobState.PLACED],
        JobState.RUNNING: [JobState.PLACED, JobState.RUNNING],
        JobState.PREEMPTED: [JobState.PLACED, JobState.RUNNING, JobState.PREEMPTED],
        JobState.SUCCEEDED: [JobState.PLACED, JobState.RUNNING, JobState.SUCCEEDED],
        JobState.FAILED: [JobState.PLACED, JobState.FAILED],
        JobState.CANCELLED: [JobState.CANCELLED],
    }
    with JobStore(tmp_path / "jobs.db") as store:
        job = _add(store)
        for step in paths[source]:
            store.transition(job, step)
        if target in TRANSITIONS[source]:
            assert store.transition(job, target).state is target
        else:
            with pytest.raises(IllegalTransition, match=f"from {source.value} to {target.value}"):
                store.transition(job, target)
            assert store.get(job).state is source
            assert store.events(job)[-1].to_state is source


def test_terminal_states_are_final():
    assert all(not TRANSITIONS[s] for s in JobState if s.terminal)
    assert all(TRANSITIONS[s] for s in JobState if not s.terminal)


def test_expected_state_guards_against_races(tmp_path):
    with JobStore(tmp_path / "jobs.db") as store:
        job = _add(store)
        store.transition(job, JobState.CANCELLED)
        with pytest.raises(EvalfleetError, match="is cancelled, not queued"):
            store.transition(job, JobState.PLACED, expect=JobState.QUEUED)


def test_unknown_job_and_unknown_fields(tmp_path):
    with JobStore(tmp_path / "jobs.db") as store:
        with pytest.raises(UsageError, match="no job with id 'nope'"):
            store.get("nope")
        with pytest.raises(UsageError):
            store.transition("nope", JobState.CANCELLED)
        job = _add(store)
        with pytest.raises(ValueError, match="cannot set"):
            store.transition(job, JobState.PLACED, priority="high")


def test_store_survives_reopen(tmp_path):
    path = tmp_path / "nested" / "jobs.db"
    with JobStore(path) as store:
        job = _add(store, demand={"tp": 2}, plan={"fits": True}, total=40)
        store.transition(job, JobState.PLACED, placement=[(1, 0)])
        store.quarantine((1, 3), "failed 3 jobs")
    with JobStore(path) as store:
        record = store.get(job)
        assert record.state is JobState.PLACED and record.placement == [(1, 0)]
        assert record.demand == {"tp": 2} and record.plan == {"fits": True} and record.total == 40
        assert record.request == REQUEST
        assert store.quarantined() == {(1, 3): "failed 3 jobs"}
        assert store.schema_version == SCHEMA_VERSION
        assert len(store.events(job)) == 2


def test_list_filters_by_state(tmp_path):
    with JobStore(tmp_path / "jobs.db") as store:
        first, second = _add(store, now=1.0), _add(store, now=2.0)
        store.transition(second, JobState.CANCELLED)
        assert [j.id for j in store.list()] == [first, second]
        assert [j.id for j in store.list([JobState.QUEUED])] == [first]
        assert store.list([]) == []


def test_refuses_a_newer_schema(tmp_path):
    path = tmp_path / "jobs.db"
    JobStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(EvalfleetError, match="newer than this evalfleet"):
        JobStore(path)


def test_refuses_a_file_that_is_not_a_database(tmp_path):
    path = tmp_path / "jobs.db"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(EvalfleetError, match="cannot open the job store"):
        JobStore(path)


def test_device_failures_count_distinct_jobs_in_window(tmp_path):
    with JobStore(tmp_path / "jobs.db") as store:
        assert store.record_device_failure((0, 1), "a", "crash", since=0, now=1) == 1
        assert store.record_device_failure((0, 1), "a", "crash", since=0, now=2) == 1
        assert store.record_device_failure((0, 1), "b", "crash", since=0, now=3) == 2
        assert store.record_device_failure((0, 1), "c", "crash", since=2.5, now=4) == 2
        assert store.record_device_failure((0, 2), "c", "crash", since=0, now=4) == 1
        store.quarantine((0, 1), "bad")
        store.release((0, 1))
        assert store.quarantined() == {}


def test_resolve_db_path(monkeypatch, tmp_path):
    monkeypatch.setenv("EVALFLEET_DB", str(tmp_path / "env.db"))
    assert resolve_db_path(str(tmp_path / "flag.db")) == tmp_path / "flag.db"
    assert resolve_db_path(None) == tmp_path / "env.db"
    monkeypatch.delenv("EVALFLEET_DB")
    default = resolve_db_path(None)
    assert default.name == "jobs.db" and "evalfleet" in default.parts


def _writer(path: str, count: int) -> None:
    with JobStore(path) as store:
        for _ in range(count):
            job = store.add(REQUEST, priority="low", max_attempts=1)
            store.transition(job, JobState.CANCELLED)


def test_concurrent_processes_do_not_lose_writes(tmp_path):
    path = str(tmp_path / "jobs.db")
    JobStore(path).close()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(path, 25)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    with JobStore(path) as store:
        jobs = store.list()
        assert len(jobs) == 75 and all(j.state is JobState.CANCELLED for j in jobs)
        assert len(store.events()) == 150


def test_migrations_upgrade_an_older_file_in_place(tmp_path, monkeypatch):
    from evalfleet.orchestrator import store as store_module

    path = tmp_path / "jobs.db"
    with JobStore(path) as old:
        job = _add(old)
    upgraded = [*store_module.MIGRATIONS, lambda conn: conn.execute("ALTER TABLE jobs ADD COLUMN note TEXT")]
    monkeypatch.setattr(store_module, "MIGRATIONS", upgraded)
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", len(upgraded))
    with JobStore(path) as new:
        assert new.schema_version == SCHEMA_VERSION + 1
        columns = [row[1] for row in new._conn.execute("PRAGMA table_info(jobs)")]
        assert "note" in columns and new.get(job).state is JobState.QUEUED


@contextlib.contextmanager
def _store_at_version(path, monkeypatch, version: int):
    """A store made by an evalfleet whose schema stopped at `version`."""
    from evalfleet.orchestrator import store as store_module

    with monkeypatch.context() as patch:
        patch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:version])
        patch.setattr(store_module, "SCHEMA_VERSION", version)
        with JobStore(path) as old:
            yield old


def test_a_v5_store_gains_the_stall_columns_that_progress_writes(tmp_path, monkeypatch):
    path = tmp_path / "jobs.db"
    with _store_at_version(path, monkeypatch, 5) as old:
        job = _add(old)
    with JobStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        store.transition(job, JobState.PLACED)
        record = store.transition(job, JobState.RUNNING)
        assert (record.progress_at, record.slowest_batch_s) == (None, None)
        store.update_progress(job, done=2, progress_at=10.0, slowest_batch_s=1.5, now=11.0)
        store.update_progress(job, done=2, slowest_batch_s=1.5, now=20.0)  # nothing moved
        record = store.get(job)
        assert (record.progress_at, record.slowest_batch_s, record.heartbeat_at) == (10.0, 1.5, 20.0)
        store.update_progress(job, done=2, now=30.0)  # another kind of request: no batch measured yet
        assert (store.get(job).progress_at, store.get(job).slowest_batch_s) == (10.0, None)


def test_a_v6_store_gains_the_retry_columns_that_recovery_writes(tmp_path, monkeypatch):
    from evalfleet.orchestrator.recovery import RecoveryOptions, recover

    path = tmp_path / "jobs.db"
    with _store_at_version(path, monkeypatch, 6) as old:
        job = _add(old)
        with old._write() as conn:  # as a v6 scheduler left it: running on one device
            conn.execute("UPDATE jobs SET state = 'running', placement = '[[0, 1]]' WHERE id = ?", (job,))
    with JobStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        record = store.get(job)
        assert (record.failure_streak, record.avoid) == (0, None)
        decision = recover(store, job, "killed by SIGKILL", 50.0, RecoveryOptions(backoff_base_s=30))
        assert decision.retry_at == 50.0  # a first failure: at once
        record = store.get(job)
        assert (record.failure_streak, record.avoid, record.placement) == (1, [(0, 1)], None)
