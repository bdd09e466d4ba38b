"""Small inline SVG line charts of the monitor's history, drawn on the server (no script needed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

from evalfleet.monitoring.snapshot import MetricsSnapshot

WIDTH, HEIGHT, PAD = 360, 110, 24
COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777")


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[float, float | None]]
    """(seconds since the epoch, percent) pairs; None where the reading was missing."""


def line_chart(title: str, series: Sequence[Series], *, top: float = 100.0) -> Markup:
    """Percent over time: one line per series, the last value in the legend."""
    times = [t for s in series for t, v in s.points if v is not None]
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT + 18 * len(series)}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
             f'<text x="{PAD}" y="12" class="chart-title">{escape(title)}</text>']
    for fraction in (0.0, 0.5, 1.0):
        y = PAD + (HEIGHT - 2 * PAD) * (1 - fraction)
        parts.append(f'<line x1="{PAD}" x2="{WIDTH - 4}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{PAD - 4}" y="{y + 3:.1f}" class="axis" text-anchor="end">{top * fraction:.0f}</text>')
    if times:
        start, end = min(times), max(times)
        span = max(end - start, 1e-9)
        parts.append(f'<text x="{WIDTH - 4}" y="{HEIGHT - 6}" class="axis" text-anchor="end">'
                     f'last {max(end - start, 0) / 60:.1f} min</text>')
        for number, line in enumerate(series):
            color = COLORS[number % len(COLORS)]
            coordinates = [(PAD + (WIDTH - 4 - PAD) * (t - start) / span,
                            PAD + (HEIGHT - 2 * PAD) * (1 - min(max(v / top, 0.0), 1.0)))
                           for t, v in line.points if v is not None]
            if coordinates:
                path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coordinates)
                parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.8"/>')
            last = next((v for _, v in reversed(line.points) if v is not None), None)
            legend = f"{line.label}: {last:.0f}%" if last is not None else f"{line.label}: n/a"
            y = HEIGHT + 14 + 18 * number
            parts.append(f'<rect x="{PAD}" y="{y - 9}" width="10" height="10" fill="{color}"/>'
                         f'<text x="{PAD + 16}" y="{y}" class="legend">{escape(legend)}</text>')
    else:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" class="axis" text-anchor="middle">no samples yet</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def pool_charts(history: Sequence[MetricsSnapshot]) -> list[Markup]:
    """GPU utilization and memory per GPU; on a machine without GPUs, host CPU and memory."""
    if history and history[-1].gpus:
        indices = sorted({gpu.index for snapshot in history for gpu in snapshot.gpus})

        def per_gpu(read) -> list[Series]:
            return [Series(f"GPU {i}", [(s.timestamp, next((read(g) for g in s.gpus if g.index == i), None))
                                        for s in history]) for i in indices]

        return [line_chart("GPU utilization (%)", per_gpu(lambda g: g.utilization_percent)),
                line_chart("GPU memory used (%)", per_gpu(lambda g: g.memory_percent))]
    return [line_chart("host CPU (%)", [Series("CPU", [(s.timestamp, s.host.cpu_percent) for s in history])]),
            line_chart("host memory (%)", [Series("memory", [(s.timestamp, s.host.memory_percent) for s in history])])]
