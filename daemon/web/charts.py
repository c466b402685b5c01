"""Small inline SVG charts rendered on the server (no JavaScript, no build step).

Layout in rows, so nothing overlaps: the title on its own line, the legend below it
(wrapping onto more lines when the names do not fit), then the plot with its y axis
ticks and x labels, thinned so neighbours never touch. Text widths are estimated
generously from the character count at the fixed font sizes of style.css; the browser
test measures the real boxes. Text goes through `html.escape`; the output is marked
safe by the templates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

PALETTE = ("#2b6cb0", "#38a169", "#d69e2e", "#e53e3e", "#805ad5", "#319795", "#dd6b20", "#718096")

TITLE_PX, AXIS_PX = 13, 11  # font sizes, as in style.css (svg.chart .chart-title / .axis)
CHAR_W = 0.62  # a generous average glyph width, in ems, of the sans-serif fonts the console uses
TITLE_ROW, LEGEND_ROW = 20, 16
SWATCH, LEGEND_GAP = 10, 14
RIGHT, BOTTOM = 12, 26  # room right of the plot and for the x labels under it
LEGEND_NAME_CHARS = 24


def _text_w(text: str, px: int) -> float:
    return len(text) * px * CHAR_W


def _nice_ticks(peak: float) -> list[float]:
    """0 and two or three round steps up to at least `peak` (1, 2, 2.5 or 5 x 10^k)."""
    if peak <= 0:
        return [0.0, 1.0]
    raw = peak / 3
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(int(math.ceil(peak / step - 1e-9)) + 1)]


def _fmt(value: float) -> str:
    return f"{value:g}"


class _Layout:
    """Where the title, legend and plot go for a chart `width` wide."""

    def __init__(self, width: int, height: int, title: str, names: list[str], ticks: list[float], unit: str) -> None:
        self.width, self.title = width, title
        self.legend = self._legend_rows(names, width)
        self.top = TITLE_ROW + LEGEND_ROW * len(self.legend) + 10
        labels = [_fmt(t) + unit for t in ticks]
        self.left = int(max(_text_w(label, AXIS_PX) for label in labels)) + 12
        self.plot_w = width - self.left - RIGHT
        self.height = max(height, self.top + 80 + BOTTOM)
        self.plot_h = self.height - self.top - BOTTOM
        self.ticks, self.tick_labels = ticks, labels

    @staticmethod
    def _legend_rows(names: list[str], width: int) -> list[list[tuple[str, int, float]]]:
        """(name, series index, x) per legend row, wrapping when a row is full."""
        rows: list[list[tuple[str, int, float]]] = [[]]
        x = 4.0
        for i, name in enumerate(names):
            shown = name if len(name) <= LEGEND_NAME_CHARS else name[: LEGEND_NAME_CHARS - 1] + "…"
            item_w = SWATCH + 4 + _text_w(shown, AXIS_PX) + LEGEND_GAP
            if rows[-1] and x + item_w > width - 4:
                rows.append([])
                x = 4.0
            rows[-1].append((shown, i, x))
            x += item_w
        return rows if rows[0] else []

    def y(self, value: float) -> float:
        return self.top + self.plot_h - self.plot_h * value / self.ticks[-1]

    def frame(self) -> list[str]:
        parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {self.width} {self.height}" '
                 f'width="{self.width}" height="{self.height}" role="img" aria-label="{escape(self.title)}">',
                 f'<text x="4" y="{TITLE_ROW - 5}" class="chart-title">{escape(self.title)}</text>']
        for row_index, row in enumerate(self.legend):
            row_y = TITLE_ROW + LEGEND_ROW * row_index
            for name, i, x in row:
                colour = PALETTE[i % len(PALETTE)]
                parts.append(f'<rect x="{x:.1f}" y="{row_y + 3}" width="{SWATCH}" height="{SWATCH}" fill="{colour}"/>'
                             f'<text x="{x + SWATCH + 4:.1f}" y="{row_y + 12}" class="axis legend">'
                             f'{escape(name)}</text>')
        right = self.left + self.plot_w
        for tick, label in zip(self.ticks, self.tick_labels):
            y = self.y(tick)
            parts.append(f'<line x1="{self.left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" '
                         f'stroke="{"#999" if tick == 0 else "#edf2f7"}"/>'
                         f'<text x="{self.left - 4}" y="{y + 4:.1f}" text-anchor="end" class="axis">'
                         f'{escape(label)}</text>')
        parts.append(f'<line x1="{self.left}" y1="{self.top}" x2="{self.left}" y2="{self.top + self.plot_h}" '
                     'stroke="#999"/>')
        return parts

    def x_labels(self, labels: Sequence[str], centre_of: list[float]) -> list[str]:
        """Every k-th label, k chosen so neighbouring labels keep a gap."""
        shown = [label[5:] if len(label) == 10 else label for label in labels]  # YYYY-MM-DD -> MM-DD
        if not shown:
            return []
        step = (centre_of[1] - centre_of[0]) if len(centre_of) > 1 else float(self.plot_w)
        widest = max(_text_w(s, AXIS_PX) for s in shown) + 8
        every = max(1, math.ceil(widest / step))
        # Counted back from the last label (today, the newest period), which is always shown.
        return [f'<text x="{centre_of[i]:.1f}" y="{self.height - 6}" text-anchor="middle" class="axis">'
                f'{escape(shown[i])}</text>' for i in sorted(range(len(shown) - 1, -1, -every))]


def bar_chart(labels: Sequence[str], series: dict[str, Sequence[float]], width: int = 580, height: int = 200,
              title: str = "") -> str:
    """Grouped bars per label (e.g. per day: received / results / failed)."""
    if not labels:
        return _empty(width, height, title)
    ticks = _nice_ticks(max([max(v, default=0) for v in series.values()] + [0]))
    layout = _Layout(width, height, title, list(series), ticks, "")
    group_w = layout.plot_w / len(labels)
    bar_w = max(1.0, group_w * 0.8 / max(1, len(series)))
    parts = layout.frame()
    base = layout.top + layout.plot_h
    for s_index, (name, values) in enumerate(series.items()):
        colour = PALETTE[s_index % len(PALETTE)]
        for i, value in enumerate(values):
            y = layout.y(value)
            x = layout.left + i * group_w + group_w * 0.1 + s_index * bar_w
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{base - y:.1f}" '
                         f'fill="{colour}"><title>{escape(labels[i])} {escape(name)}: {value:g}</title></rect>')
    parts.extend(layout.x_labels(labels, [layout.left + (i + 0.5) * group_w for i in range(len(labels))]))
    parts.append("</svg>")
    return "".join(parts)


def line_chart(x_labels: Sequence[str], series: dict[str, Sequence[float | None]], width: int = 580,
               height: int = 200, title: str = "", y_max: float | None = None, unit: str = "") -> str:
    """One polyline per series over shared x labels (gaps where a value is None)."""
    if not x_labels:
        return _empty(width, height, title)
    values = [v for vs in series.values() for v in vs if v is not None]
    ticks = _nice_ticks(y_max if y_max is not None else max(values + [0.0]))
    layout = _Layout(width, height, title, list(series), ticks, unit)
    peak = ticks[-1]
    # The first and last points sit inside the plot, far enough in for their labels too.
    margin = max(8.0, max(_text_w(x[5:] if len(x) == 10 else x, AXIS_PX) for x in x_labels) / 2 + 2)
    if len(x_labels) == 1:
        xs = [layout.left + layout.plot_w / 2]
    else:
        step = (layout.plot_w - 2 * margin) / (len(x_labels) - 1)
        xs = [layout.left + margin + i * step for i in range(len(x_labels))]
    parts = layout.frame()
    for s_index, (name, ys) in enumerate(series.items()):
        colour = PALETTE[s_index % len(PALETTE)]
        points = []
        for i, y in enumerate(ys):
            if y is None:
                continue
            px, py = xs[i], layout.y(min(y, peak))
            points.append(f"{px:.1f},{py:.1f}")
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{colour}">'
                         f'<title>{escape(name)} {escape(x_labels[i])}: {y:.1f}{escape(unit)}</title></circle>')
        if len(points) > 1:
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{" ".join(points)}"/>')
    parts.extend(layout.x_labels(x_labels, xs))
    parts.append("</svg>")
    return "".join(parts)


def _empty(width: int, height: int, title: str) -> str:
    return (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">'
            f'<text x="4" y="{TITLE_ROW - 5}" class="chart-title">{escape(title)}</text>'
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="axis">no data yet</text></svg>')
