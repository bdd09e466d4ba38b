"""A run's monitoring in figures: running totals that outlive the bounded history, the
timeline behind `monitoring.json`, and the utilization/memory chart in `monitoring.png`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalfleet.monitoring.snapshot import GPUMetrics, MetricsSnapshot

_GIB = 1024**3


@dataclass
class _GpuTotals:
    name: str | None = None
    memory_total_bytes: int | None = None
    peak_memory_used_bytes: int | None = None
    utilization_sum: float = 0.0
    utilization_samples: int = 0
    max_temperature_c: float | None = None
    peak_power_w: float | None = None

    def add(self, gpu: GPUMetrics) -> None:
        self.name = gpu.name
        self.memory_total_bytes = gpu.memory_total_bytes
        self.peak_memory_used_bytes = _max(self.peak_memory_used_bytes, gpu.memory_used_bytes)
        self.max_temperature_c = _max(self.max_temperature_c, gpu.temperature_c)
        self.peak_power_w = _max(self.peak_power_w, gpu.power_w)
        if gpu.utilization_percent is not None:
            self.utilization_sum += gpu.utilization_percent
            self.utilization_samples += 1

    @property
    def mean_utilization(self) -> float | None:
        return self.utilization_sum / self.utilization_samples if self.utilization_samples else None


def _max(current: Any, value: Any) -> Any:
    if value is None:
        return current
    return value if current is None else max(current, value)


@dataclass
class RunTotals:
    """Peaks and means over every sample of the run, however short the in-memory history."""

    samples: int = 0
    first: float | None = None
    last: float | None = None
    cpu_sum: float = 0.0
    peak_workers_rss_bytes: int = 0
    peak_host_memory_percent: float = 0.0
    gpus: dict[int, _GpuTotals] = field(default_factory=dict)

    def add(self, snapshot: MetricsSnapshot) -> None:
        self.samples += 1
        self.first = snapshot.timestamp if self.first is None else self.first
        self.last = snapshot.timestamp
        self.cpu_sum += snapshot.host.cpu_percent
        self.peak_workers_rss_bytes = max(self.peak_workers_rss_bytes, snapshot.host.workers_rss_bytes)
        self.peak_host_memory_percent = max(self.peak_host_memory_percent, snapshot.host.memory_percent)
        for gpu in snapshot.gpus:
            self.gpus.setdefault(gpu.index, _GpuTotals()).add(gpu)

    def as_dict(self) -> dict[str, Any]:
        gpus = {
            f"gpu{i}": {
                "name": t.name,
                "peak_memory_used_bytes": t.peak_memory_used_bytes,
                "memory_total_bytes": t.memory_total_bytes,
                "mean_utilization_percent": _round(t.mean_utilization),
                "max_temperature_c": t.max_temperature_c,
                "peak_power_w": t.peak_power_w,
            }
            for i, t in sorted(self.gpus.items())
        }
        means = [t.mean_utilization for t in self.gpus.values() if t.mean_utilization is not None]
        peaks = [t.peak_memory_used_bytes for t in self.gpus.values() if t.peak_memory_used_bytes is not None]
        return {
            "samples": self.samples,
            "duration_s": _round(self.last - self.first) if self.first is not None and self.last is not None else 0.0,
            "peak_memory": {
                "host_rss_bytes": self.peak_workers_rss_bytes,
                "host_memory_percent": _round(self.peak_host_memory_percent),
                "gpu_bytes": max(peaks) if peaks else None,
            },
            "mean_utilization_percent": _round(sum(means) / len(means)) if means else None,
            "mean_host_cpu_percent": _round(self.cpu_sum / self.samples) if self.samples else None,
            "gpus": gpus,
        }


def _round(value: float | None, digits: int = 3) -> float | None:
    return round(value, digits) if value is not None else None


def timeline(samples: Sequence[MetricsSnapshot]) -> dict[str, Any]:
    """Columns of the run over time (seconds from the first sample), for the report and the chart."""
    start = samples[0].timestamp if samples else 0.0
    gpus: dict[str, dict[str, list[float | int | None]]] = {}
    for n, sample in enumerate(samples):
        for gpu in sample.gpus:
            column = gpus.setdefault(f"gpu{gpu.index}", {"utilization_percent": [None] * len(samples),
                                                          "memory_used_bytes": [None] * len(samples)})
            column["utilization_percent"][n] = gpu.utilization_percent
            column["memory_used_bytes"][n] = gpu.memory_used_bytes
    return {
        "t": [round(s.timestamp - start, 3) for s in samples],
        "host_cpu_percent": [round(s.host.cpu_percent, 1) for s in samples],
        "workers_rss_bytes": [s.host.workers_rss_bytes for s in samples],
        "gpus": gpus,
    }


def draw_chart(series: dict[str, Any], path: Path, title: str) -> None:
    """Utilization (top) and memory (bottom) over time; host CPU and RSS stand in when there is no GPU."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 6), dpi=100)
    FigureCanvasAgg(figure)
    busy, memory = figure.subplots(2, 1, sharex=True)
    t = series["t"]
    for name, column in series["gpus"].items():
        busy.plot(t, [v if v is not None else float("nan") for v in column["utilization_percent"]], label=name)
        memory.plot(t, [v / _GIB if v is not None else float("nan") for v in column["memory_used_bytes"]], label=name)
    busy.plot(t, series["host_cpu_percent"], label="host CPU", linestyle="--", color="grey")
    memory.plot(t, [v / _GIB for v in series["workers_rss_bytes"]], label="evalfleet RSS", linestyle="--", color="grey")
    busy.set_ylabel("utilization (%)")
    busy.set_ylim(0, 105)
    memory.set_ylabel("memory used (GiB)")
    memory.set_xlabel("seconds since the first sample")
    for axis in (busy, memory):
        axis.grid(alpha=0.3)
        axis.legend(loc="upper right", fontsize="small")
    busy.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
