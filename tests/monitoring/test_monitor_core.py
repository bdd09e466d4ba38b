"""MultiGPUPerformanceMonitor end to end, with NVML faked at the pynvml boundary and the host real."""

from __future__ import annotations

import json
import time

import pytest
from fake_nvml import FakeGpu, FakeNvml

from evalfleet.monitoring import AlertThresholds, MetricsSnapshot, MultiGPUPerformanceMonitor
from evalfleet.monitoring.store import SampleStore
from evalfleet.types import UsageError


def wait_for(condition, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting for the sampler"
        time.sleep(0.02)


def test_background_sampling_keeps_a_bounded_history(make_monitor, fake_nvml):
    monitor = make_monitor(interval=0.02, history=3, nvml=fake_nvml)
    monitor.start()
    assert monitor.running and monitor.job_running
    wait_for(lambda: monitor.summary()["samples"] >= 6)
    monitor.stop()
    assert not monitor.running and not monitor.job_running
    assert len(monitor.history) == 3
    assert monitor.summary()["samples"] >= 6
    assert monitor.sampler_cpu_seconds > 0
    assert monitor.sampler_wall_seconds >= monitor.sampler_cpu_seconds * 0.5
    stamps = [s.timestamp for s in monitor.history]
    assert stamps == sorted(stamps)


def test_context_manager_marks_a_running_job(make_monitor, fake_nvml):
    monitor = make_monitor(interval=0.02, nvml=fake_nvml)
    with monitor as same:
        assert same is monitor and monitor.running
        wait_for(lambda: len(monitor.history) >= 1)
        assert monitor.get_current_metrics().job_running
    assert not monitor.running
    assert monitor.start(job=False).running and not monitor.job_running
    monitor.start()  # already running: nothing changes
    assert not monitor.job_running


def test_current_metrics_is_a_typed_snapshot(make_monitor, fake_nvml):
    fake_nvml.gpus[1].utilization = 88
    snapshot = make_monitor(nvml=fake_nvml).get_current_metrics()
    assert isinstance(snapshot, MetricsSnapshot)
    assert snapshot.nvml == "available" and snapshot.driver_version == "550.54.15"
    assert [g.utilization_percent for g in snapshot.gpus] == [0.0, 88.0]
    assert snapshot.host.processes and snapshot.host.cpu_count >= 1
    assert MetricsSnapshot.model_validate_json(snapshot.model_dump_json()) == snapshot


def test_without_nvml_the_snapshot_says_why(make_monitor):
    snapshot = make_monitor(nvml=FakeNvml(init_error=12)).get_current_metrics()
    assert snapshot.gpus == [] and snapshot.nvml == "unavailable: NVML Shared Library Not Found"


def test_communication_events_give_link_bandwidth_and_share(make_monitor, fake_nvml):
    monitor = make_monitor(nvml=fake_nvml)
    for _ in range(10):
        monitor.record_communication_event("all_reduce", 400_000_000, 0.02, devices=[0, 1, 2, 3])
        monitor.record_communication_event("send", 1_000_000, 0.001, devices=[3, 4])
        monitor.record_step(0.1)
    stats = monitor.get_current_metrics().communication
    assert stats.events == 20 and stats.steps == 10
    assert stats.share == pytest.approx(0.21)
    assert stats.recent_share == pytest.approx(0.21)
    links = {link.link: link for link in stats.links}
    assert links["0-1-2-3"].bandwidth_bytes_per_s == pytest.approx(20e9)
    assert links["0-1-2-3"].bus_bandwidth_bytes_per_s == pytest.approx(30e9)  # 2(n-1)/n with n=4
    assert links["3-4"].bus_bandwidth_bytes_per_s == pytest.approx(1e9)
    assert monitor.summary()["communication_share"] == pytest.approx(0.21)


def test_bad_events_and_steps_are_usage_errors(make_monitor, fake_nvml):
    monitor = make_monitor(nvml=fake_nvml)
    with pytest.raises(UsageError):
        monitor.record_communication_event("all_reduce", -1, 0.1, [0, 1])
    with pytest.raises(UsageError):
        monitor.record_communication_event(" ", 1, 0.1, [0, 1])
    with pytest.raises(UsageError):
        monitor.record_step(0.0)
    with pytest.raises(UsageError):
        monitor.record_step(1.0, stage=0, busy_seconds=-1.0)


def test_pipeline_stage_idle_time_becomes_a_finding_and_suggestion(make_monitor, fake_nvml):
    monitor = make_monitor(nvml=fake_nvml)
    monitor.set_layout(pp=2)
    for _ in range(5):
        monitor.record_step(1.0, stage=0, busy_seconds=0.95)
        monitor.record_step(1.0, stage=1, busy_seconds=0.45)
    findings = monitor.detect_bottlenecks()
    assert [f.kind for f in findings] == ["pipeline_bubble"]
    assert findings[0].evidence["idle_fraction"] == {"stage0": 0.05, "stage1": 0.55}
    (suggestion,) = monitor.generate_optimization_suggestions()
    assert suggestion.change == {"tp": 2, "pp": 1}


def test_nvlink_presence_comes_from_nvml_when_the_layout_does_not_say(make_monitor):
    pcie_only = FakeNvml([FakeGpu(i, not_supported={"nvmlDeviceGetNvLinkState"}) for i in range(4)])
    monitor = make_monitor(nvml=pcie_only)
    monitor.set_layout(tp=4)
    monitor.sample()
    for _ in range(5):
        monitor.record_communication_event("all_reduce", 10**8, 0.05, [0, 1, 2, 3])
        monitor.record_step(0.1)
    (suggestion,) = monitor.generate_optimization_suggestions()
    assert suggestion.change == {"tp": 1, "pp": 4}


def test_alerts_reach_the_callback_and_the_database(make_monitor, tmp_path):
    fake = FakeNvml([FakeGpu(0)])
    heard = []
    monitor = make_monitor(nvml=fake, db_path=tmp_path / "mon.sqlite", on_alert=heard.append,
                           thresholds=AlertThresholds(fire_after=1, clear_after=1))
    monitor.sample()
    fake.gpus[0].temperature = 90
    monitor.sample()
    fake.gpus[0].temperature = 40
    monitor.sample()
    assert [(a.rule, a.active) for a in heard] == [("temperature", True), ("temperature", False)]
    assert monitor.summary()["alerts_fired"][0]["rule"] == "temperature"
    monitor.close()
    store = SampleStore(tmp_path / "mon.sqlite")
    assert len(store.samples()) == 3 and [s.gpus[0].temperature_c for s in store.samples(limit=2)] == [90.0, 40.0]
    assert [a.active for a in store.alerts()] == [True, False]
    store.close()


def test_summary_peaks_outlive_the_bounded_history(make_monitor):
    fake = FakeNvml([FakeGpu(0)])
    monitor = make_monitor(nvml=fake, history=2)
    for used, util in [(10, 50), (60, 100), (20, 0), (15, 10)]:
        fake.gpus[0].memory_used = used * 1024**3
        fake.gpus[0].utilization = util
        monitor.sample()
    summary = monitor.summary()
    assert summary["samples"] == 4 and len(monitor.history) == 2
    assert summary["peak_memory"]["gpu_bytes"] == 60 * 1024**3
    assert summary["peak_memory"]["host_rss_bytes"] > 0
    assert summary["mean_utilization_percent"] == 40.0
    assert summary["gpus"]["gpu0"]["mean_utilization_percent"] == 40.0
    assert summary["nvml"] == "available" and summary["bottlenecks"] == [] and summary["alerts_active"] == 0
    json.dumps(summary)


def test_write_report_writes_json_and_png(make_monitor, fake_nvml, tmp_path):
    monitor = make_monitor(nvml=fake_nvml)
    for util in (10, 60, 95):
        fake_nvml.gpus[0].utilization = util
        monitor.sample()
    written = monitor.write_report(tmp_path / "run")
    assert [p.name for p in written] == ["monitoring.json", "monitoring.png"]
    document = json.loads(written[0].read_text())
    assert document["summary"]["samples"] == 3
    assert document["timeline"]["gpus"]["gpu0"]["utilization_percent"] == [10.0, 60.0, 95.0]
    assert len(document["timeline"]["t"]) == 3 and document["timeline"]["t"][0] == 0.0
    assert written[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in monitor.write_report(tmp_path / "nopng", png=False)] == ["monitoring.json"]


def test_report_without_gpus_still_draws_the_host(make_monitor, tmp_path):
    monitor = make_monitor(nvml=FakeNvml(init_error=12))
    monitor.sample()
    json_path, png_path = monitor.write_report(tmp_path)
    assert json.loads(json_path.read_text())["timeline"]["gpus"] == {}
    assert png_path.stat().st_size > 1000


def test_report_reads_this_runs_samples_from_the_database(make_monitor, tmp_path):
    db = tmp_path / "mon.sqlite"
    old = make_monitor(nvml=FakeNvml([FakeGpu(0)]), db_path=db)
    old.sample()
    old.close()
    monitor = make_monitor(nvml=FakeNvml([FakeGpu(0)]), db_path=db, history=1)
    for _ in range(3):
        monitor.sample()
    (json_path,) = monitor.write_report(tmp_path / "run", png=False)
    assert len(json.loads(json_path.read_text())["timeline"]["t"]) == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(interval=0), "interval must be a positive"),
    (dict(interval=-1.0), "interval must be a positive"),
    (dict(history=0), "at least one sample"),
])
def test_bad_settings_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        MultiGPUPerformanceMonitor(nvml=FakeNvml(), **kwargs)


def test_layout_and_paths_are_checked(make_monitor, tmp_path):
    monitor = make_monitor(nvml=FakeNvml())
    with pytest.raises(UsageError, match="'tp'"):
        monitor.set_layout(tp=0)
    with pytest.raises(UsageError, match="'colour'"):
        monitor.set_layout(colour="blue")
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="cannot create the report folder"):
        monitor.write_report(tmp_path / "file" / "sub")
    with pytest.raises(UsageError, match="cannot open the monitoring database"):
        MultiGPUPerformanceMonitor(nvml=FakeNvml(), db_path=tmp_path / "file" / "db.sqlite")


def test_a_failing_sample_does_not_stop_the_sampler(make_monitor, caplog):
    fake = FakeNvml([FakeGpu(0)])
    monitor = make_monitor(nvml=fake, interval=0.02)
    fake.nvmlEventSetWait_v2 = None  # a broken binding: calling it raises TypeError
    monitor.start()
    wait_for(lambda: "monitoring sample failed" in caplog.text)
    fake.nvmlEventSetWait_v2 = FakeNvml.nvmlEventSetWait_v2.__get__(fake)
    wait_for(lambda: len(monitor.history) >= 1)
    assert monitor.running


def test_registered_workers_and_windowed_detection(make_monitor):
    import os

    fake = FakeNvml([FakeGpu(0)])
    monitor = make_monitor(nvml=fake)
    assert monitor.nvml_status == "available"
    monitor.register_pid(os.getppid())
    assert os.getppid() in {p.pid for p in monitor.sample().host.processes}
    monitor.unregister_pid(os.getppid())
    fake.gpus[0].memory_used = fake.gpus[0].memory_total - 2**30  # nearly full, then freed
    for _ in range(3):
        monitor.sample()
    fake.gpus[0].memory_used = 2**30
    for _ in range(3):
        monitor.sample()
    assert [f.kind for f in monitor.detect_bottlenecks()] == ["near_oom"]
    assert monitor.detect_bottlenecks(window=3) == []
