"""What `evalfleet monitor` shows: a live rich table, or JSON snapshots for scripts."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from evalfleet.monitoring.alerts import AlertThresholds
from evalfleet.monitoring.monitor import MultiGPUPerformanceMonitor
from evalfleet.monitoring.snapshot import MetricsSnapshot
from evalfleet.types import UsageError

_GIB = 1024**3


def _num(value: float | int | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _pair(first: float | None, second: float | None, scale: float = 1.0, fmt: str = "{:.0f}") -> str:
    """'a/b' with each side scaled, '-' for a side NVML could not give."""
    return "/".join(_num(v / scale if v is not None else None, fmt) for v in (first, second))


def render(snapshot: MetricsSnapshot, monitor: MultiGPUPerformanceMonitor | None = None) -> Group:
    parts: list[Table | Text] = []
    if snapshot.gpus:
        gpus = Table(title=f"GPUs (driver {snapshot.driver_version or '?'})", title_justify="left")
        for column in ("GPU", "name", "util %", "memory GiB", "temp C", "power W", "SM MHz", "throttle",
                       "PCIe tx/rx MB/s", "NVLink tx/rx MB/s", "XID", "ECC c/u"):
            gpus.add_column(column, justify="left" if column in ("name", "throttle") else "right")
        for g in snapshot.gpus:
            gpus.add_row(
                str(g.index), g.name or "-", _num(g.utilization_percent),
                _pair(g.memory_used_bytes, g.memory_total_bytes, _GIB, "{:.1f}"), _num(g.temperature_c),
                _pair(g.power_w, g.power_limit_w), _num(g.sm_clock_mhz),
                ",".join(r for r in g.throttle_reasons if r != "gpu_idle") or "-",
                _pair(g.pcie_tx_bytes_per_s, g.pcie_rx_bytes_per_s, 1e6),
                _pair(g.nvlink_tx_bytes_per_s, g.nvlink_rx_bytes_per_s, 1e6),
                _num(g.xid_errors), _pair(g.ecc_corrected, g.ecc_uncorrected),
            )
        parts.append(gpus)
    else:
        parts.append(Text(f"NVML {snapshot.nvml}", style="yellow"))
    host = snapshot.host
    machine = Table(title="host", title_justify="left")
    for column in ("CPU %", "cores", "busiest core %", "memory GiB", "memory %"):
        machine.add_column(column, justify="right")
    machine.add_row(
        f"{host.cpu_percent:.0f}", str(host.cpu_count), f"{max(host.per_cpu_percent, default=0):.0f}",
        _pair(host.memory_used_bytes, host.memory_total_bytes, _GIB, "{:.1f}"), f"{host.memory_percent:.0f}",
    )
    parts.append(machine)
    processes = Table(title="evalfleet processes", title_justify="left")
    for column in ("pid", "name", "role", "RSS MiB", "CPU % of a core"):
        processes.add_column(column, justify="left" if column in ("name", "role") else "right")
    for p in host.processes:
        processes.add_row(str(p.pid), p.name, p.role, f"{p.rss_bytes / 2**20:.0f}", _num(p.cpu_percent))
    parts.append(processes)
    if monitor is not None:
        for alert in monitor.alerts.active:
            parts.append(Text(f"ALERT [{alert.severity}] {alert.message}", style="bold red"))
    return Group(*parts)


def run_monitor_command(
    once: bool,
    as_json: bool,
    interval: float,
    count: int | None = None,
    duration: float | None = None,
    thresholds: Path | None = None,
) -> None:
    """`evalfleet monitor`: one snapshot with `once`, else one per interval until Ctrl-C, `count` or `duration`."""
    if count is not None and count < 1:
        raise UsageError("--count must be at least 1")
    if duration is not None and duration <= 0:
        raise UsageError("--duration must be a positive number of seconds")
    limits = AlertThresholds.from_yaml(thresholds) if thresholds is not None else None
    monitor = MultiGPUPerformanceMonitor(interval=interval, history=max(1, count or 600), thresholds=limits)
    console = Console()
    try:
        if once:
            snapshot = monitor.sample()
            if as_json:
                print(snapshot.model_dump_json(indent=2))
            else:
                console.print(render(snapshot, monitor))
            return
        _watch(monitor, console, as_json, count, duration)
    finally:
        monitor.close()


def _watch(monitor: MultiGPUPerformanceMonitor, console: Console, as_json: bool,
           count: int | None, duration: float | None) -> None:
    end = time.monotonic() + duration if duration is not None else None
    taken = 0
    live = None if as_json else Live(console=console, auto_refresh=False)
    try:
        if live is not None:
            live.start()
        while True:
            snapshot = monitor.sample()
            taken += 1
            if live is None:
                print(snapshot.model_dump_json(), flush=True)
            else:
                live.update(render(snapshot, monitor), refresh=True)
            if (count is not None and taken >= count) or (end is not None and time.monotonic() >= end):
                return
            time.sleep(monitor.interval if end is None else max(0.0, min(monitor.interval, end - time.monotonic())))
    except KeyboardInterrupt:
        return
    finally:
        if live is not None:
            live.stop()
