"""A task's score against the training step, with ± stderr bars: inline SVG drawn on the server, as the
pool page's charts are (`charts.py`), for a leaderboard section whose rows are checkpoints."""

from __future__ import annotations

from html import escape

from markupsafe import Markup

from evalfleet.service.charts import COLORS, HEIGHT, PAD, WIDTH
from evalfleet.service.leaderboard import Column, Section

CAP = 3


def step_charts(section: Section) -> list[Markup]:
    """One chart per column of a checkpoints section; none for other sections."""
    if not section.checkpoints:
        return []
    return [step_chart(column, [(row.step, row.cells[column.name].value, row.cells[column.name].stderr)
                                for row in section.rows if column.name in row.cells and row.step is not None])
            for column in section.columns]


def step_chart(column: Column, points: list[tuple[int, float, float | None]]) -> Markup:
    title = f"{column.task} ({column.metric}) by step"
    parts = [f'<svg class="chart step-chart" data-task="{escape(column.task)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>',
             f'<text x="{PAD}" y="12" class="chart-title">{escape(title)}</text>']
    if not points:
        return Markup("".join(parts) + "</svg>")
    lows = [value - (stderr or 0.0) for _, value, stderr in points]
    highs = [value + (stderr or 0.0) for _, value, stderr in points]
    bottom, top = min(lows), max(highs)
    if top - bottom < 1e-9:
        bottom, top = bottom - 0.5, top + 0.5
    first, last = points[0][0], points[-1][0]

    def x(step: int) -> float:
        return PAD + (WIDTH - 4 - PAD) * ((step - first) / (last - first) if last > first else 0.5)

    def y(value: float) -> float:
        return PAD + (HEIGHT - 2 * PAD) * (1 - (value - bottom) / (top - bottom))

    for value in (bottom, top):
        parts.append(f'<line x1="{PAD}" x2="{WIDTH - 4}" y1="{y(value):.1f}" y2="{y(value):.1f}" class="grid"/>'
                     f'<text x="{PAD - 4}" y="{y(value) + 3:.1f}" class="axis" text-anchor="end">{value:.3g}</text>')
    parts.append(f'<text x="{PAD}" y="{HEIGHT - 6}" class="axis">step {first}</text>'
                 f'<text x="{WIDTH - 4}" y="{HEIGHT - 6}" class="axis" text-anchor="end">step {last}</text>')
    color = COLORS[0]
    line = " ".join(f"{x(step):.1f},{y(value):.1f}" for step, value, _ in points)
    parts.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.8"/>')
    for (step, value, stderr), low, high in zip(points, lows, highs):
        if stderr:
            parts.append(f'<path class="error-bar" d="M{x(step):.1f},{y(low):.1f}V{y(high):.1f}'
                         f'M{x(step) - CAP:.1f},{y(low):.1f}h{2 * CAP}M{x(step) - CAP:.1f},{y(high):.1f}h{2 * CAP}" '
                         f'stroke="{color}" fill="none"/>')
        parts.append(f'<circle class="point" cx="{x(step):.1f}" cy="{y(value):.1f}" r="3" fill="{color}">'
                     f'<title>step {step}: {value:.4f}' + (f" ± {stderr:.4f}" if stderr else "") + "</title></circle>")
    parts.append("</svg>")
    return Markup("".join(parts))
