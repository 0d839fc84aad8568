"""Line charts as SVG, drawn on the server (store -> dashboard API -> the browser).

The curves page shows one chart per number (reward, loss, KL, ...), one line per policy
(the shared adapter and each personal one), one point per adapter version. Drawing them
here keeps the page free of any charting code: the browser inserts the SVG as it is, and
the tests can count a chart's points without a browser. Every text is escaped; colors are
presentation attributes, so the page's Content-Security-Policy (no inline styles) holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f",
           "#be185d")
WIDTH, HEIGHT = 640, 240
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 44, 40
PAD = 12  # between the plot's frame and its first and last points


@dataclass(frozen=True)
class Point:
    x: int  # the position on the x axis (an index into the chart's x labels)
    y: float
    label: str  # what the point is (an adapter version's name)


@dataclass(frozen=True)
class Series:
    name: str
    points: tuple[Point, ...]


def _ticks(low: float, high: float) -> list[float]:
    """Three to six round values from ``low`` to ``high``."""
    span = high - low
    step = 10 ** math.floor(math.log10(span / 4))
    for multiple in (1, 2, 5, 10):
        if span / (step * multiple) <= 5:
            step *= multiple
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _bounds(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if math.isclose(low, high):
        pad = abs(low) * 0.1 or 1.0
        return low - pad, high + pad
    pad = (high - low) * 0.08
    return low - pad, high + pad


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def line_chart(key: str, title: str, x_labels: Sequence[str], series: Sequence[Series], *,
               reference: tuple[float, str] | None = None) -> str:
    """An SVG line chart: ``series`` over positions 0..len(x_labels)-1, a dashed
    ``reference`` line (value, label) when given. Each point is a ``circle.point`` with
    ``data-series`` and ``data-label``, and its value in a tooltip."""
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" data-chart="{escape(key)}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
           f'aria-label="{escape(title)}">',
           f'<text x="{LEFT}" y="16" font-size="13" font-weight="600" fill="#111827">'
           f'{escape(title)}</text>']
    values = [p.y for s in series for p in s.points]
    if not values or not x_labels:
        out.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" '
                   'font-size="12" fill="#6b7280">nothing to plot yet</text></svg>')
        return "".join(out)
    low, high = _bounds([*values, *([reference[0]] if reference else [])])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    n = len(x_labels)

    def x_at(i: int) -> float:
        return LEFT + (plot_w / 2 if n == 1 else PAD + (plot_w - 2 * PAD) * i / (n - 1))

    def y_at(v: float) -> float:
        return TOP + plot_h * (1 - (v - low) / (high - low))

    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" '
               'stroke="#e5e7eb"/>')
    for tick in _ticks(low, high):
        y = y_at(tick)
        out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'stroke="#f3f4f6"/><text x="{LEFT - 6}" y="{y + 4:.1f}" font-size="10" '
                   f'text-anchor="end" fill="#6b7280">{_fmt(tick)}</text>')
    every = max(1, math.ceil(n / 12))  # at most a dozen labels under the axis
    for i, label in enumerate(x_labels):
        if i % every == 0 or i == n - 1:
            out.append(f'<text x="{x_at(i):.1f}" y="{TOP + plot_h + 16}" font-size="10" '
                       f'text-anchor="middle" fill="#6b7280">{escape(label)}</text>')
    out.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 6}" font-size="10" '
               'text-anchor="middle" fill="#6b7280">adapter version</text>')
    if reference is not None:
        y = y_at(reference[0])
        out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'stroke="#9ca3af" stroke-dasharray="4 3"/><text x="{LEFT + plot_w - 4}" '
                   f'y="{y - 4:.1f}" font-size="10" text-anchor="end" fill="#6b7280">'
                   f'{escape(reference[1])}</text>')
    legend_x = LEFT  # a row under the title
    for k, line in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        xy = " ".join(f"{x_at(p.x):.1f},{y_at(p.y):.1f}" for p in line.points)
        out.append(f'<polyline points="{xy}" fill="none" stroke="{color}" stroke-width="2"/>')
        for p in line.points:
            out.append(f'<circle class="point" cx="{x_at(p.x):.1f}" cy="{y_at(p.y):.1f}" r="3.5" '
                       f'fill="{color}" data-series="{escape(line.name)}" '
                       f'data-label="{escape(p.label)}"><title>{escape(p.label)}: '
                       f'{_fmt(p.y)}</title></circle>')
        out.append(f'<rect x="{legend_x}" y="24" width="10" height="10" fill="{color}"/>'
                   f'<text x="{legend_x + 14}" y="33" font-size="11" fill="#374151">'
                   f'{escape(line.name)}</text>')
        legend_x += 26 + 7 * len(line.name)
    out.append("</svg>")
    return "".join(out)
