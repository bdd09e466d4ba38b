"""Prometheus export. GPU series use NVIDIA dcgm-exporter's names, units and labels, so existing
DCGM dashboards and alert rules read evalfleet unchanged; host and communication series are
`evalfleet_*`.

dcgm-exporter declares a few fields (ECC, XID) as counters but exposes them without a
`_total` suffix; prometheus-client would add one to a counter, so those are exposed as gauges
to keep the DCGM names exact. Every value is read from the monitor's latest snapshot at
scrape time, into a registry of our own (never the process-global one).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from evalfleet.monitoring.monitor import MultiGPUPerformanceMonitor
from evalfleet.monitoring.snapshot import GPUMetrics, MetricsSnapshot
from evalfleet.types import UsageError

_MIB = 1024 * 1024
_GPU_LABELS = ["gpu", "UUID", "device", "modelName", "Hostname"]

# (DCGM field name, help, value from a GPU reading or None when NVML did not give it)
DCGM_METRICS: list[tuple[str, str, Callable[[GPUMetrics], float | int | None]]] = [
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", lambda g: g.utilization_percent),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).", lambda g: g.memory_copy_utilization_percent),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).",
     lambda g: g.memory_used_bytes / _MIB if g.memory_used_bytes is not None else None),
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).",
     lambda g: g.memory_free_bytes / _MIB if g.memory_free_bytes is not None else None),
    ("DCGM_FI_DEV_FB_TOTAL", "Framebuffer memory total (in MiB).",
     lambda g: g.memory_total_bytes / _MIB if g.memory_total_bytes is not None else None),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", lambda g: g.temperature_c),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", lambda g: g.power_w),
    ("DCGM_FI_DEV_ENFORCED_POWER_LIMIT", "Effective power limit (in W).", lambda g: g.power_limit_w),
    ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", lambda g: g.sm_clock_mhz),
    ("DCGM_FI_DEV_MAX_SM_CLOCK", "Maximum SM clock frequency (in MHz).", lambda g: g.sm_clock_max_mhz),
    ("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "Current clock throttle reasons (bitmask).", lambda g: g.throttle_mask),
    ("DCGM_FI_PROF_PCIE_TX_BYTES", "PCIe transmitted bytes per second (NVML, 20 ms window).",
     lambda g: g.pcie_tx_bytes_per_s),
    ("DCGM_FI_PROF_PCIE_RX_BYTES", "PCIe received bytes per second (NVML, 20 ms window).",
     lambda g: g.pcie_rx_bytes_per_s),
    ("DCGM_FI_PROF_NVLINK_TX_BYTES", "NVLink transmitted data bytes per second, all links.",
     lambda g: g.nvlink_tx_bytes_per_s),
    ("DCGM_FI_PROF_NVLINK_RX_BYTES", "NVLink received data bytes per second, all links.",
     lambda g: g.nvlink_rx_bytes_per_s),
    ("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered (0: none since the monitor started).",
     lambda g: (g.last_xid or 0) if g.xid_errors is not None else None),
    ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "Total number of single-bit volatile ECC errors.", lambda g: g.ecc_corrected),
    ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "Total number of double-bit volatile ECC errors.", lambda g: g.ecc_uncorrected),
]


def _gpu_families(snapshot: MetricsSnapshot) -> Iterator[Metric]:
    hostname = socket.gethostname()
    labels = {
        g.index: [str(g.index), g.uuid or "", f"nvidia{g.index}", g.name or "", hostname] for g in snapshot.gpus
    }
    for name, help_text, read in DCGM_METRICS:
        family = GaugeMetricFamily(name, help_text, labels=_GPU_LABELS)
        for gpu in snapshot.gpus:
            if (value := read(gpu)) is not None:
                family.add_metric(labels[gpu.index], float(value))
        yield family
    xid = CounterMetricFamily("evalfleet_gpu_xid_errors", "XID errors seen since the monitor started.", labels=["gpu"])
    links = GaugeMetricFamily("evalfleet_gpu_nvlink_active_links", "Active NVLink links.", labels=["gpu"])
    for gpu in snapshot.gpus:
        if gpu.xid_errors is not None:
            xid.add_metric([str(gpu.index)], gpu.xid_errors)
        if gpu.nvlink_active_links is not None:
            links.add_metric([str(gpu.index)], gpu.nvlink_active_links)
    yield xid
    yield links


def _host_families(snapshot: MetricsSnapshot) -> Iterator[Metric]:
    host = snapshot.host
    yield GaugeMetricFamily("evalfleet_nvml_available", "1 when NVML could be read.",
                            value=1.0 if snapshot.nvml == "available" else 0.0)
    yield GaugeMetricFamily("evalfleet_host_cpu_percent", "Whole-machine CPU utilization (in %).",
                            value=host.cpu_percent)
    cores = GaugeMetricFamily("evalfleet_host_cpu_core_percent", "Per-core CPU utilization (in %).", labels=["core"])
    for core, value in enumerate(host.per_cpu_percent):
        cores.add_metric([str(core)], value)
    yield cores
    yield GaugeMetricFamily("evalfleet_host_memory_used_bytes", "Host memory in use.", value=host.memory_used_bytes)
    yield GaugeMetricFamily("evalfleet_host_memory_total_bytes", "Host memory.", value=host.memory_total_bytes)
    rss = GaugeMetricFamily("evalfleet_worker_rss_bytes", "Resident memory of an evalfleet process.",
                            labels=["pid", "name", "role"])
    cpu = GaugeMetricFamily("evalfleet_worker_cpu_percent", "CPU of an evalfleet process (in % of one core).",
                            labels=["pid", "name", "role"])
    for process in host.processes:
        labels = [str(process.pid), process.name, process.role]
        rss.add_metric(labels, process.rss_bytes)
        if process.cpu_percent is not None:
            cpu.add_metric(labels, process.cpu_percent)
    yield rss
    yield cpu


def _communication_families(monitor: MultiGPUPerformanceMonitor, snapshot: MetricsSnapshot) -> Iterator[Metric]:
    stats = snapshot.communication
    per_link: list[tuple[str, str, Any]] = [
        ("evalfleet_communication_bytes", "Bytes moved by collectives and transfers.", lambda link: link.bytes),
        ("evalfleet_communication_seconds", "Seconds spent in collectives and transfers.", lambda link: link.seconds),
        ("evalfleet_communication_events", "Collectives and transfers recorded.", lambda link: link.events),
    ]
    for name, help_text, read in per_link:
        family = CounterMetricFamily(name, help_text, labels=["link"])
        for link in stats.links:
            family.add_metric([link.link], read(link))
        yield family
    for name, attr, help_text in (
        ("evalfleet_communication_bandwidth_bytes_per_second", "bandwidth_bytes_per_s",
         "Bytes over seconds, per link."),
        ("evalfleet_communication_bus_bandwidth_bytes_per_second", "bus_bandwidth_bytes_per_s",
         "Bus bandwidth per link (nccl-tests convention)."),
    ):
        family = GaugeMetricFamily(name, help_text, labels=["link"])
        for link in stats.links:
            if (value := getattr(link, attr)) is not None:
                family.add_metric([link.link], value)
        yield family
    for name, value, help_text in (
        ("evalfleet_communication_share", stats.share, "Communication seconds over step seconds, whole run."),
        ("evalfleet_communication_recent_share", stats.recent_share, "The same over the recent window."),
    ):
        family = GaugeMetricFamily(name, help_text)
        if value is not None:
            family.add_metric([], value)
        yield family
    yield CounterMetricFamily("evalfleet_steps", "Steps recorded by the engine.", value=stats.steps)
    yield CounterMetricFamily("evalfleet_step_seconds", "Wall seconds of recorded steps.", value=stats.step_seconds)
    active = GaugeMetricFamily("evalfleet_alert_active", "1 for each active alert.",
                               labels=["rule", "subject", "severity"])
    for alert in monitor.alerts.active:
        active.add_metric([alert.rule, alert.subject, alert.severity], 1.0)
    yield active
    yield CounterMetricFamily("evalfleet_alerts_fired", "Alerts fired since the monitor started.",
                              value=monitor.alerts.fired_count)
    yield CounterMetricFamily("evalfleet_monitor_sampler_cpu_seconds", "CPU seconds used by the sampler thread.",
                              value=monitor.sampler_cpu_seconds)


class MonitorCollector(Collector):
    """Reads the monitor at scrape time."""

    def __init__(self, monitor: MultiGPUPerformanceMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        snapshot = self.monitor.get_current_metrics()
        yield from _gpu_families(snapshot)
        yield from _host_families(snapshot)
        yield from _communication_families(self.monitor, snapshot)


def registry_for(monitor: MultiGPUPerformanceMonitor) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MonitorCollector(monitor))
    return registry


def render_prometheus(monitor: MultiGPUPerformanceMonitor) -> str:
    """The Prometheus text exposition of the monitor's latest snapshot."""
    return generate_latest(registry_for(monitor)).decode()


def start_http_exporter(monitor: MultiGPUPerformanceMonitor, port: int, host: str = "127.0.0.1") -> Any:
    """Serve /metrics on host:port (port 0 picks a free one: read `server.server_port`).
    Returns the server; call `server.shutdown()` to stop it."""
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry_for(monitor))
    except OSError as error:
        raise UsageError(f"cannot serve metrics on {host}:{port}: {error.strerror or error}") from None
    return server
