"""The Prometheus exposition, read back with prometheus-client's own parser."""

from __future__ import annotations

import os

import urllib.request

import prometheus_client
import pytest
from fake_nvml import FakeGpu, FakeNvml
from prometheus_client.parser import text_string_to_metric_families

from evalfleet.monitoring import render_prometheus, start_http_exporter
from evalfleet.types import UsageError


def parse(text: str) -> dict[str, list]:
    """metric family name -> its samples."""
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def by_gpu(samples) -> dict[str, float]:
    return {s.labels["gpu"]: s.value for s in samples}


def test_gpu_series_use_dcgm_names_units_and_labels(make_monitor):
    fake = FakeNvml([FakeGpu(0, utilization=93, memory_used=60 * 2**30, power_mw=612_000, temperature=71),
                     FakeGpu(1, not_supported={"nvmlDeviceGetPowerUsage"})])
    fake.inject_xid(0, 63)
    families = parse(render_prometheus(make_monitor(nvml=fake)))
    assert by_gpu(families["DCGM_FI_DEV_GPU_UTIL"]) == {"0": 93.0, "1": 0.0}
    assert by_gpu(families["DCGM_FI_DEV_FB_USED"])["0"] == 60 * 1024
    assert by_gpu(families["DCGM_FI_DEV_FB_FREE"])["0"] == pytest.approx(fake.gpus[0].memory_total / 2**20 - 60 * 1024)
    assert by_gpu(families["DCGM_FI_DEV_GPU_TEMP"])["0"] == 71.0
    assert by_gpu(families["DCGM_FI_DEV_POWER_USAGE"]) == {"0": 612.0}  # GPU 1 cannot say: no sample, not 0
    assert by_gpu(families["DCGM_FI_DEV_SM_CLOCK"]) == {"0": 345.0, "1": 345.0}
    assert by_gpu(families["DCGM_FI_DEV_XID_ERRORS"]) == {"0": 63.0, "1": 0.0}
    assert by_gpu(families["DCGM_FI_DEV_CLOCK_THROTTLE_REASONS"])["0"] == 1.0
    assert by_gpu(families["DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"]) == {"0": 0.0, "1": 0.0}
    assert by_gpu(families["evalfleet_gpu_xid_errors"]) == {"0": 1.0, "1": 0.0}
    labels = families["DCGM_FI_DEV_GPU_UTIL"][0].labels
    assert labels["UUID"] == fake.gpus[0].uuid and labels["modelName"] == "NVIDIA H100 80GB HBM3"
    assert labels["device"] == "nvidia0" and labels["Hostname"]
    assert families["evalfleet_nvml_available"][0].value == 1.0


def test_host_and_communication_series(make_monitor):
    monitor = make_monitor(nvml=FakeNvml(init_error=12))
    monitor.record_communication_event("all_reduce", 10**9, 0.5, [0, 1])
    monitor.record_step(2.0)
    families = parse(render_prometheus(monitor))
    assert families["evalfleet_nvml_available"][0].value == 0.0
    assert families["DCGM_FI_DEV_GPU_UTIL"] == []
    assert 0.0 <= families["evalfleet_host_cpu_percent"][0].value <= 100.0
    assert len(families["evalfleet_host_cpu_core_percent"]) >= 1
    assert families["evalfleet_host_memory_total_bytes"][0].value > 0
    roles = {s.labels["pid"]: s.labels["role"] for s in families["evalfleet_worker_rss_bytes"]}
    assert roles.pop(str(os.getpid())) == "self"
    assert set(roles.values()) <= {"child"}  # none registered; a neighbour test's processes may be children
    (sent,) = families["evalfleet_communication_bytes"]
    assert sent.name == "evalfleet_communication_bytes_total" and sent.labels == {"link": "0-1"} and sent.value == 1e9
    assert families["evalfleet_communication_share"][0].value == 0.25
    assert families["evalfleet_communication_bandwidth_bytes_per_second"][0].value == 2e9
    assert families["evalfleet_steps"][0].value == 1.0


def test_active_alerts_are_exported(make_monitor):
    from evalfleet.monitoring import AlertThresholds

    fake = FakeNvml([FakeGpu(0, temperature=95)])
    monitor = make_monitor(nvml=fake, thresholds=AlertThresholds(fire_after=1))
    families = parse(render_prometheus(monitor))
    (alert,) = families["evalfleet_alert_active"]
    assert alert.labels == {"rule": "temperature", "subject": "gpu0", "severity": "warning"}
    assert families["evalfleet_alerts_fired"][0].value == 1.0


def test_the_global_registry_is_left_alone(make_monitor):
    render_prometheus(make_monitor(nvml=FakeNvml()))
    assert "DCGM_FI_DEV_GPU_UTIL" not in prometheus_client.generate_latest().decode()


def test_http_endpoint_binds_loopback_and_serves_metrics(make_monitor):
    monitor = make_monitor(nvml=FakeNvml([FakeGpu(0, utilization=42)]))
    server = start_http_exporter(monitor, port=0)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert by_gpu(parse(text)["DCGM_FI_DEV_GPU_UTIL"]) == {"0": 42.0}
    finally:
        server.shutdown()
        server.server_close()


def test_a_taken_port_is_a_usage_error(make_monitor):
    monitor = make_monitor(nvml=FakeNvml())
    server = start_http_exporter(monitor, port=0)
    try:
        with pytest.raises(UsageError, match=r"cannot serve metrics on 127\.0\.0\.1"):
            start_http_exporter(monitor, port=server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
