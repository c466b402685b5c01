"""Small inline SVG charts rendered on the server (no JavaScript, no build step).

Text goes through `html.escape`; the output is marked safe by the templates.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

PALETTE = ("#2b6cb0", "#38a169", "#d69e2e", "#e53e3e", "#805ad5", "#319795", "#dd6b20", "#718096")


def bar_chart(labels: Sequence[str], series: dict[str, Sequence[float]], width: int = 640, height: int = 180,
              title: str = "") -> str:
    """Grouped bars per label (e.g. per day: received / completed / failed)."""
    if not labels:
        return _empty(width, height, title)
    left, bottom, top = 36, 28, 22
    plot_w, plot_h = width - left - 8, height - bottom - top
    peak = max([max(v, default=0) for v in series.values()] + [1])
    group_w = plot_w / len(labels)
    bar_w = max(1.0, group_w * 0.8 / max(1, len(series)))
    parts = [_frame(width, height, title), _y_axis(left, top, plot_h, peak)]
    for s_index, (name, values) in enumerate(series.items()):
        colour = PALETTE[s_index % len(PALETTE)]
        for i, value in enumerate(values):
            h = plot_h * value / peak
            x = left + i * group_w + group_w * 0.1 + s_index * bar_w
            parts.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                         f'fill="{colour}"><title>{escape(labels[i])} {escape(name)}: {value:g}</title></rect>')
    parts.extend(_x_labels(labels, left, group_w, height))
    parts.append(_legend(list(series), width))
    parts.append("</svg>")
    return "".join(parts)


def line_chart(x_labels: Sequence[str], series: dict[str, Sequence[float | None]], width: int = 640,
               height: int = 200, title: str = "", y_max: float | None = None, unit: str = "") -> str:
    """One polyline per series over shared x labels (gaps where a value is None)."""
    if not x_labels:
        return _empty(width, height, title)
    left, bottom, top = 40, 28, 22
    plot_w, plot_h = width - left - 8, height - bottom - top
    values = [v for vs in series.values() for v in vs if v is not None]
    peak = y_max if y_max is not None else max(values + [1.0])
    single = len(x_labels) == 1  # one period sits in the middle, not on the axis
    step = float(plot_w) if single else plot_w / (len(x_labels) - 1)
    origin = left + plot_w / 2 if single else float(left)
    parts = [_frame(width, height, title), _y_axis(left, top, plot_h, peak)]
    for s_index, (name, ys) in enumerate(series.items()):
        colour = PALETTE[s_index % len(PALETTE)]
        points = []
        for i, y in enumerate(ys):
            if y is None:
                continue
            px, py = origin + i * step, top + plot_h - plot_h * min(y, peak) / peak
            points.append(f"{px:.1f},{py:.1f}")
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{colour}">'
                         f'<title>{escape(name)} {escape(x_labels[i])}: {y:.1f}{escape(unit)}</title></circle>')
        if len(points) > 1:
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{" ".join(points)}"/>')
    parts.extend(_x_labels(x_labels, origin - step / 2, step, height))
    parts.append(_legend(list(series), width))
    parts.append("</svg>")
    return "".join(parts)


def _frame(width: int, height: int, title: str) -> str:
    return (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">'
            f'<text x="4" y="14" class="chart-title">{escape(title)}</text>')


def _y_axis(left: int, top: int, plot_h: int, peak: float) -> str:
    return (f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#999"/>'
            f'<line x1="{left}" y1="{top + plot_h}" x2="{left + 2000}" y2="{top + plot_h}" stroke="#999"/>'
            f'<text x="{left - 4}" y="{top + 8}" text-anchor="end" class="axis">{peak:g}</text>'
            f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" class="axis">0</text>')


def _x_labels(labels: Sequence[str], left: float, step: float, height: int) -> list[str]:
    every = max(1, len(labels) // 8)
    return [f'<text x="{left + i * step + step / 2:.1f}" y="{height - 8}" text-anchor="middle" class="axis">'
            f'{escape(label[5:] if len(label) == 10 else label)}</text>'
            for i, label in enumerate(labels) if i % every == 0]


def _legend(names: list[str], width: int) -> str:
    items = []
    x = width - 8 - 110 * len(names)
    for i, name in enumerate(names):
        colour = PALETTE[i % len(PALETTE)]
        items.append(f'<rect x="{x + i * 110}" y="5" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{x + i * 110 + 14}" y="14" class="axis">{escape(name[:16])}</text>')
    return "".join(items)


def _empty(width: int, height: int, title: str) -> str:
    return _frame(width, height, title) + f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" ' \
        f'class="axis">no data yet</text></svg>'
