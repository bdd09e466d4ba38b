"""`evalfleet monitor`: JSON snapshots, the bounded live view, and one-sentence errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from clitools import run_main, run_subprocess
from typer.testing import CliRunner

from evalfleet.cli import app


def test_once_json_has_host_and_an_empty_gpu_list_with_the_reason():
    result = CliRunner().invoke(app, ["monitor", "--once", "--json"])
    assert result.exit_code == 0, result.output
    snapshot = json.loads(result.stdout)
    if snapshot["nvml"] == "available":  # a GPU machine
        assert snapshot["gpus"] and snapshot["gpus"][0]["memory_total_bytes"] > 0
    else:
        assert snapshot["nvml"].startswith("unavailable: ") and snapshot["gpus"] == []
    assert snapshot["host"]["cpu_count"] >= 1 and snapshot["host"]["memory_total_bytes"] > 0
    assert any(p["role"] == "self" for p in snapshot["host"]["processes"])


def test_the_installed_command_prints_one_snapshot():
    entry = Path(sys.executable).with_name("evalfleet")  # the console script, when installed
    if entry.exists():
        command = [str(entry), "monitor", "--once", "--json"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    else:
        result = run_subprocess(["monitor", "--once", "--json"], timeout=120)
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    assert set(snapshot) >= {"host", "gpus", "nvml", "timestamp"}


def test_json_stream_is_one_line_per_sample():
    result = CliRunner().invoke(app, ["monitor", "--json", "--count", "3", "--interval", "0.05"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    stamps = [json.loads(line)["timestamp"] for line in lines]
    assert stamps == sorted(stamps) and len(set(stamps)) == 3


def test_live_table_runs_bounded():
    result = CliRunner().invoke(app, ["monitor", "--count", "2", "--interval", "0.05"])
    assert result.exit_code == 0, result.output
    assert "host" in result.stdout and "evalfleet processes" in result.stdout
    assert "NVML unavailable" in result.stdout or "GPUs (driver" in result.stdout


def test_duration_bounds_the_watch():
    result = CliRunner().invoke(app, ["monitor", "--json", "--duration", "0.3", "--interval", "0.1"])
    assert result.exit_code == 0, result.output
    assert 2 <= len(result.stdout.strip().splitlines()) <= 6


def test_once_table():
    result = CliRunner().invoke(app, ["monitor", "--once"])
    assert result.exit_code == 0 and "CPU %" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--interval", "0", "--once"], "interval must be a positive"),
        (["--count", "0"], "--count must be at least 1"),
        (["--duration", "-1"], "--duration must be a positive"),
        (["--thresholds", "/nonexistent/alerts.yaml", "--once"], "cannot read alert thresholds"),
    ],
)
def test_bad_arguments_exit_2_with_one_sentence(args, message, capsys, monkeypatch):
    code, _, err = run_main(["monitor", *args], capsys, monkeypatch)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_thresholds_file_is_used(tmp_path):
    path = tmp_path / "alerts.yaml"
    path.write_text("memory_percent: 99\nmemory_clear_percent: 98\n")
    result = CliRunner().invoke(app, ["monitor", "--once", "--json", "--thresholds", str(path)])
    assert result.exit_code == 0 and json.loads(result.stdout)["host"]


def test_live_view_shows_gpus_and_active_alerts(make_monitor):
    from fake_nvml import FakeGpu, FakeNvml
    from rich.console import Console

    from evalfleet.monitoring import AlertThresholds
    from evalfleet.monitoring.console import render

    fake = FakeNvml([FakeGpu(0, utilization=77, temperature=93, throttle=0x20),
                     FakeGpu(1, not_supported={"nvmlDeviceGetPowerUsage"})])
    monitor = make_monitor(nvml=fake, thresholds=AlertThresholds(fire_after=1))
    console = Console(width=200, record=True)
    console.print(render(monitor.sample(), monitor))
    text = console.export_text()
    assert "NVIDIA H100 80GB HBM3" in text and "driver 550.54.15" in text
    assert "sw_thermal" in text and "-/700" in text  # GPU 1's power is unknown, not zero
    assert "ALERT [warning] GPU 0 is at 93 C" in text
