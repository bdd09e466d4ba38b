"""`run --wandb-args`: the finished run logged by lm-eval's WandbLogger, in W&B's offline mode (nothing is
sent anywhere); the test reads the offline run's own record file back with W&B's protobuf messages."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

from clitools import run_main

BLOCK = 32768  # the record file's block size (a LevelDB-style log: 7-byte header, then records)


def wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data, position, pending, records = path.read_bytes(), 7, b"", []
    assert data.startswith(b":W&B")
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # a block's tail too short for a header is padding
            position += BLOCK - position % BLOCK
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_run_logs_its_results_and_samples_to_wandb(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    code, _, err = run_main(["run", "--model", "demo", "--tasks", "demo_mc", "--limit", "4", "--log-samples",
                             "--output", str(tmp_path / "out"), "--wandb-args", "project=evalfleet-test,name=demo-run"],
                            capsys, monkeypatch)
    assert code == 0, err
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert len(runs) == 1, (f"{run_file.stat().st_size} bytes, records: {[r.WhichOneof('record_type') for r in records]}; "
                            f"stderr: {err[-2000:]}")
    (run,) = runs
    assert (run.project, run.display_name) == ("evalfleet-test", "demo-run")
    logged = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
              for r in records if r.WhichOneof("record_type") == "history" for item in r.history.item}
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]["demo_mc"]
    assert logged["demo_mc/acc"] == results["acc,none"] and logged["demo_mc/acc_norm"] == results["acc_norm,none"]
    assert logged["demo_mc_eval_results/nrows"] == 4  # the per-sample table, one row per document
    assert list((run_file.parent / "files" / "media" / "table").glob("demo_mc_eval_results_*.table.json"))


def test_without_the_wandb_package_the_flag_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    for command in ("run", "submit"):
        code, out, err = run_main([command, "--model", "demo", "--tasks", "demo_mc", "--output" if command == "run"
                                   else "--db", str(tmp_path / command), "--wandb-args", "project=p"], capsys, monkeypatch)
        assert code == 2 and out == "" and err == (
            "error: --wandb-args needs the package 'wandb'; install it with: pip install 'evalfleet[wandb]'\n")
        assert not (tmp_path / command).exists()
