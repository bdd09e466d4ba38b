"""Synthetic snapshots for the rules that only read numbers (alerts, bottlenecks)."""

from __future__ import annotations

from typing import Any

from evalfleet.monitoring.nvml import THROTTLE_BITS
from evalfleet.monitoring.snapshot import CommunicationStats, GPUMetrics, HostMetrics, MetricsSnapshot, ProcessMetrics

GIB = 1024**3


def gpu(index: int = 0, util: float | None = 90.0, used_gib: float | None = 40.0, total_gib: float = 80.0,
        temp: float | None = 60.0, power: float | None = 500.0, limit: float | None = 700.0,
        throttle: list[str] | None = None, clock: int | None = 1980, **extra: Any) -> GPUMetrics:
    reasons = throttle or []
    mask = sum(bit for bit, name in THROTTLE_BITS.items() if name in reasons)
    return GPUMetrics(
        index=index, name="NVIDIA H100 80GB HBM3", utilization_percent=util,
        memory_used_bytes=int(used_gib * GIB) if used_gib is not None else None,
        memory_total_bytes=int(total_gib * GIB), temperature_c=temp, power_w=power, power_limit_w=limit,
        sm_clock_mhz=clock, sm_clock_max_mhz=1980, throttle_mask=mask, throttle_reasons=reasons, **extra,
    )


def snapshot(gpus: list[GPUMetrics] | None = None, cpu: float = 20.0, host_memory_percent: float = 30.0,
             job_running: bool = True, share: float | None = None, t: float = 0.0,
             processes: list[tuple[int, float | None]] | None = None) -> MetricsSnapshot:
    procs = [ProcessMetrics(pid=pid, name="python", role="self" if n == 0 else "child", rss_bytes=GIB, cpu_percent=c)
             for n, (pid, c) in enumerate(processes or [(100, 10.0)])]
    host = HostMetrics(cpu_percent=cpu, per_cpu_percent=[cpu] * 4, cpu_count=4,
                       memory_used_bytes=int(host_memory_percent / 100 * 64 * GIB), memory_total_bytes=64 * GIB,
                       memory_percent=host_memory_percent, processes=procs)
    return MetricsSnapshot(timestamp=1_700_000_000.0 + t, nvml="available", gpus=gpus if gpus is not None else [gpu()],
                           host=host, communication=CommunicationStats(recent_share=share), job_running=job_running)
