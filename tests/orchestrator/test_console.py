"""`evalfleet submit`, `status`, `queue` and `cancel` against a store, run in-process."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from clitools import run_main

from evalfleet.orchestrator import JobState, JobStore, slot_inventory
from evalfleet.orchestrator.console import queued_in_order
from evalfleet.orchestrator.pool import (
    inventory_from_dict,
    inventory_to_dict,
    pool_from_options,
    record_pool,
    submission_pool,
)
from evalfleet.planning import Inventory
from evalfleet.types import UsageError


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    db = tmp_path / "jobs.sqlite"  # the autouse fixture points EVALFLEET_DB here
    with JobStore(db) as store:
        record_pool(store, slot_inventory(2, memory_gb=4), max_attempts=5)

    def call(*args: str) -> tuple[int, str, str]:
        return run_main(list(args), capsys, monkeypatch)

    call.db = db
    return call


def _submit(cli, *args: str) -> str:
    code, out, err = cli("submit", "--model", "demo", "--tasks", "demo_mc", "--limit", "2", *args)
    assert code == 0, err
    return out.strip()


def test_submit_prints_only_the_job_id_and_stores_a_runnable_request(cli, tmp_path, monkeypatch):
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("submit", "--model", "demo", "--tasks", "demo_mc,demo_ppl", "--include-path", "my_tasks",
                         "--priority", "high", "--log-samples", "--batch-size", "4")
    job_id = out.strip()
    assert code == 0 and out == job_id + "\n" and len(job_id) == 12
    # stderr says the job's size in one line: the demo tasks' 300 x 4 choices and 80 texts, counted
    assert err.startswith("size: 1,280 requests (loglikelihood 1,200, loglikelihood_rolling 80), ") and err.count("\n") == 2
    # and the compute time it expects, from the cost model since nothing ran yet
    assert re.search(r"\nestimate: [0-9.,]+ s of compute \(modeled speeds\)\n$", err), err
    assert err.splitlines()[0].endswith(" counted")
    with JobStore(cli.db) as store:
        record = store.get(job_id)
    assert record.size["source"] == "counted" and record.size["requests"] == 1280
    assert record.state is JobState.QUEUED and record.priority == "high" and record.max_attempts == 5
    assert record.request["tasks"]["include_path"] == str(tasks.resolve())
    assert record.request["tasks"]["names"] == ["demo_mc", "demo_ppl"] and record.request["log_samples"]
    assert record.request["output_dir"] is None and record.request["batch_size"] == 4


def test_a_job_that_can_never_fit_is_refused_with_one_sentence(cli):
    code, out, err = cli("submit", "--model", "meta-llama/Llama-3.1-405B", "--tasks", "demo_mc")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "can never run on this pool (2 CPU slots)" in err
    code, out, err = cli("submit", "--model", "meta-llama/Llama-3.1-405B", "--gpus", "1", "--pool", "1xA10G-24GB")
    assert code == 1 and "can never run on this pool (1xA10G-24GB)" in err
    code, out, err = cli("submit", "--model", "demo", "--priority", "urgent")
    assert code == 2 and "--priority" in err
    with JobStore(cli.db) as store:
        assert store.list() == []


def test_status_of_one_job_as_json(cli):
    job_id = _submit(cli)
    code, out, _ = cli("status", job_id, "--json")
    document = json.loads(out)
    assert code == 0 and document["id"] == job_id and document["state"] == "queued"
    assert document["priority"] == "normal" and document["attempts"] == 0 and document["result_path"] is None
    assert document["progress"]["done"] == 0 and "total" in document["progress"]
    assert [event["to"] for event in document["events"]] == ["queued"]


def test_status_and_queue_show_progress_and_start_order(cli):
    low, normal, high = _submit(cli, "--priority", "low"), _submit(cli), _submit(cli, "--priority", "high")
    running = _submit(cli)
    now = time.time()
    with JobStore(cli.db) as store:
        store.transition(running, JobState.PLACED, placement=[(0, 0)])
        store.transition(running, JobState.RUNNING, started_at=now, pid=1)
        store.update_progress(running, done=30, total=120, tokens_per_s=2500.0, requests_per_s=10.0)
        store.transition(normal, JobState.PLACED, placement=[(0, 1)])
        store.transition(normal, JobState.QUEUED, not_before=now + 90, attempts=1, placement=None)
        assert [r.id for r in queued_in_order(store, now)] == [high, normal, low]

    code, out, _ = cli("queue")
    assert code == 0
    positions = [out.index(marker) for marker in (running, "queued, in start order", high, normal, low)]
    assert positions == sorted(positions)
    assert "30/120" in out and "2,500" in out and "retry in 1m" in out and "9s" in out  # ETA: 90 left at 10/s

    code, out, _ = cli("status")
    assert code == 0 and all(job in out for job in (low, normal, high, running)) and "2 CPU slots" in out
    code, out, _ = cli("status", "--json")
    assert {doc["id"]: doc["progress"]["eta_s"] for doc in json.loads(out)}[running] == pytest.approx(9.0, abs=0.5)
    code, out, _ = cli("status", running)
    assert code == 0 and "30/120 requests" in out and "node 0 device 0" in out and "history" in out


def test_cancel_and_unknown_jobs(cli):
    job_id = _submit(cli)
    code, _, err = cli("cancel", job_id)
    assert code == 0 and f"job {job_id} cancelled" in err
    code, _, err = cli("cancel", job_id)
    assert code == 2 and "already cancelled" in err
    for command in (["status", "nope"], ["cancel", "nope"]):
        code, out, err = cli(*command)
        assert code == 2 and out == "" and err.strip() == f"error: no job with id 'nope' in {cli.db}"
    code, out, _ = cli("queue")
    assert "the queue is empty" in out


def test_an_empty_store_and_the_db_option(cli, tmp_path):
    other = tmp_path / "elsewhere" / "jobs.db"
    code, out, _ = cli("status", "--db", str(other))
    assert code == 0 and f"no jobs in {other}" in out
    code, out, _ = cli("submit", "--model", "demo", "--tasks", "demo_mc", "--db", str(other))
    assert code == 0
    with JobStore(other) as store:
        assert [r.id for r in store.list()] == [out.strip()]


def test_scheduler_options_are_checked_before_it_starts(cli):
    code, _, err = cli("scheduler", "--gpus", "cpu", "--slots", "2")
    assert code == 2 and "either --gpus or --slots" in err
    code, _, err = cli("scheduler", "--gpus", "2x8xH100-80GB")
    assert code == 2 and "this machine only" in err


def test_pools_survive_the_store(tmp_path):
    for inventory in (Inventory.from_spec("2x4xA100-80GB"), slot_inventory(3, memory_gb=16), Inventory.cpu(8, 4)):
        assert inventory_from_dict(json.loads(json.dumps(inventory_to_dict(inventory)))) == inventory
    assert len(pool_from_options(slots=3).nodes[0].gpus) == 3
    assert pool_from_options("4xA10G-24GB").num_gpus == 4
    with pytest.raises(UsageError):
        pool_from_options("cpu", 2)
    with JobStore(tmp_path / "fresh.db") as store:  # no scheduler ever ran here: this machine
        assert submission_pool(store).is_cpu_only
        assert submission_pool(store, "8xH100").num_gpus == 8
        record_pool(store, Inventory.from_spec("2xL4"), max_attempts=2)
        assert submission_pool(store).describe() == "2xL4"
    assert Path(tmp_path / "fresh.db").exists()
