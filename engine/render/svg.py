"""Plots as inline SVG: no JavaScript, no plotting library, the same in a file and in the app.

Each function returns one ``<svg>`` element (text) with a ``<title>`` per point or bar, so a
browser shows the value on hover. Labels are escaped; numbers are formatted here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from specprof.engine.render.html import escape

WIDTH, HEIGHT = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 30, 46
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")
MAX_MARKERS = 200
"""Series with more points than this are drawn as a line without point markers."""
MAX_POINTS = 2000
"""Longer series are thinned to this many points (first and last kept)."""
ESD_BINS = 40


@dataclass(frozen=True)
class Series:
    """One line of a chart: its label and points (NaN or non-positive on a log axis: left out)."""

    label: str
    x: Sequence[float] | np.ndarray
    y: Sequence[float] | np.ndarray
    dashed: bool = False
    markers: bool = True
    """Draw each point (with its value on hover); False for fitted curves."""


@dataclass(frozen=True)
class Bar:
    left: float
    right: float
    height: float
    label: str


@dataclass
class _Axis:
    low: float
    high: float
    log: bool
    pixels: tuple[float, float]  # where low and high land
    ticks: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.log:
            self.low, self.high = math.log10(self.low), math.log10(self.high)
        if not self.high > self.low:
            pad = abs(self.low) * 0.1 or 1.0
            self.low, self.high = self.low - pad, self.high + pad
        self.ticks = _ticks(self.low, self.high, self.log)

    def __call__(self, value: float) -> float:
        v = math.log10(value) if self.log else value
        start, end = self.pixels
        return start + (v - self.low) / (self.high - self.low) * (end - start)


def _ticks(low: float, high: float, log: bool) -> list[float]:
    """About five round tick values between low and high (in log10 units on a log axis)."""
    if log and high - low >= 1:
        step = max(1, math.ceil((high - low) / 6))
        return [float(e) for e in range(math.ceil(low), math.floor(high) + 1, step)]
    if log:  # less than a decade: round numbers of the values themselves
        return [math.log10(t) for t in _ticks(10**low, 10**high, False) if t > 0]
    raw = (high - low) / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _number(value: float) -> str:
    return f"{value:.4g}"


def _usable(values: Sequence[float] | np.ndarray, log: bool) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    return array[np.isfinite(array) & (array > 0 if log else True)]


def _frame(title: str, x_axis: _Axis, y_axis: _Axis, x_label: str, y_label: str,
           chart_id: str) -> list[str]:
    """The svg opening, title, axes, ticks and grid."""
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="{escape(chart_id)}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
             f'font-family="sans-serif" font-size="11">',
             f"<title>{escape(title)}</title>",
             f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#fff"/>',
             f'<text x="{WIDTH / 2}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>']
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP
    for tick in x_axis.ticks:
        px = x0 + (tick - x_axis.low) / (x_axis.high - x_axis.low) * (x1 - x0)
        text = _number(10**tick if x_axis.log else tick)
        parts.append(f'<line x1="{px:.1f}" y1="{y0}" x2="{px:.1f}" y2="{y1}" stroke="#eee"/>'
                     f'<text x="{px:.1f}" y="{y0 + 14}" text-anchor="middle">{text}</text>')
    for tick in y_axis.ticks:
        py = y0 + (tick - y_axis.low) / (y_axis.high - y_axis.low) * (y1 - y0)
        text = _number(10**tick if y_axis.log else tick)
        parts.append(f'<line x1="{x0}" y1="{py:.1f}" x2="{x1}" y2="{py:.1f}" stroke="#eee"/>'
                     f'<text x="{x0 - 4}" y="{py + 4:.1f}" text-anchor="end">{text}</text>')
    parts.append(f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="none" '
                 f'stroke="#888"/>')
    parts.append(f'<text x="{(x0 + x1) / 2}" y="{HEIGHT - 8}" text-anchor="middle">'
                 f"{escape(x_label)}</text>")
    parts.append(f'<text transform="translate(14 {(y0 + y1) / 2}) rotate(-90)" '
                 f'text-anchor="middle">{escape(y_label)}</text>')
    return parts


def _legend(labels: Sequence[tuple[str, str, bool]]) -> list[str]:
    parts = []
    for i, (label, color, dashed) in enumerate(labels):
        y = TOP + 12 + 14 * i
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        parts.append(f'<line x1="{WIDTH - RIGHT - 150}" y1="{y - 4}" x2="{WIDTH - RIGHT - 130}" '
                     f'y2="{y - 4}" stroke="{color}" stroke-width="2"{dash}/>'
                     f'<text x="{WIDTH - RIGHT - 126}" y="{y}">{escape(label[:26])}</text>')
    return parts


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(x) <= MAX_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, MAX_POINTS).round().astype(int))
    return x[keep], y[keep]


def _empty(title: str, message: str, chart_id: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" id="{escape(chart_id)}" '
            f'viewBox="0 0 {WIDTH} 80" width="{WIDTH}" height="80" role="img" '
            f'font-family="sans-serif" font-size="12"><title>{escape(title)}</title>'
            f'<rect width="{WIDTH}" height="80" fill="#fff"/>'
            f'<text x="10" y="20" font-size="13">{escape(title)}</text>'
            f'<text x="10" y="50" fill="#666">{escape(message)}</text></svg>')


def line_chart(series: Sequence[Series], *, title: str, x_label: str, y_label: str,
               log_x: bool = False, log_y: bool = False, chart_id: str = "chart",
               bars: Sequence[Bar] = ()) -> str:
    """Lines (and optional histogram bars under them) on linear or log axes, as SVG."""
    points = []
    for one in series:
        x, y = np.asarray(one.x, dtype=np.float64), np.asarray(one.y, dtype=np.float64)
        keep = np.isfinite(x) & np.isfinite(y)
        keep &= (x > 0) if log_x else True
        keep &= (y > 0) if log_y else True
        points.append(_thin(x[keep], y[keep]))
    xs = np.concatenate([p[0] for p in points] + [np.array([b.left, b.right]) for b in bars]
                        or [np.array([])])
    ys = np.concatenate([p[1] for p in points] + [np.array([b.height]) for b in bars]
                        or [np.array([])])
    xs, ys = _usable(xs, log_x), _usable(ys, log_y)
    if xs.size == 0 or ys.size == 0:
        return _empty(title, "nothing to plot", chart_id)
    y_low = float(ys.min()) if log_y else min(0.0, float(ys.min()))
    x_axis = _Axis(float(xs.min()), float(xs.max()), log_x, (LEFT, WIDTH - RIGHT))
    y_axis = _Axis(y_low, float(ys.max()) * (1.05 if not log_y else 1.3), log_y,
                   (HEIGHT - BOTTOM, TOP))
    parts = _frame(title, x_axis, y_axis, x_label, y_label, chart_id)
    base = HEIGHT - BOTTOM
    for bar in bars:
        if (log_y and bar.height <= 0) or (log_x and bar.left <= 0):
            continue
        left, right, top = x_axis(bar.left), x_axis(bar.right), y_axis(bar.height)
        parts.append(f'<rect x="{left:.1f}" y="{top:.1f}" width="{max(right - left, 0.5):.1f}" '
                     f'height="{max(base - top, 0):.1f}" fill="#9bb7d4"><title>'
                     f"{escape(bar.label)}</title></rect>")
    legend = []
    for i, (one, (x, y)) in enumerate(zip(series, points, strict=True)):
        color = COLORS[i % len(COLORS)]
        legend.append((one.label, color, one.dashed))
        if x.size == 0:
            continue
        path = " ".join(f"{x_axis(a):.1f},{y_axis(b):.1f}" for a, b in zip(x, y, strict=True))
        dash = ' stroke-dasharray="5 3"' if one.dashed else ""
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6"{dash} '
                     f'points="{path}"><title>{escape(one.label)}</title></polyline>')
        if one.markers and x.size <= MAX_MARKERS:
            parts.extend(f'<circle cx="{x_axis(a):.1f}" cy="{y_axis(b):.1f}" r="2.5" '
                         f'fill="{color}"><title>{escape(one.label)}: {_number(a)}, '
                         f"{_number(b)}</title></circle>" for a, b in zip(x, y, strict=True))
    parts.extend(_legend(legend))
    parts.append("</svg>")
    return "".join(parts)


def marchenko_pastur_density(x: np.ndarray, q: float, s2: float) -> np.ndarray:
    """The Marchenko-Pastur density ``sqrt((b - x)(x - a)) / (2 pi s2 q x)`` on its bulk
    [a, b] = s2 (1 -+ sqrt q)^2, zero outside (aspect ratio q <= 1, variance s2)."""
    root = math.sqrt(q)
    a, b = s2 * (1 - root) ** 2, s2 * (1 + root) ** 2
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    inside = (x > a) & (x < b)
    out[inside] = np.sqrt((b - x[inside]) * (x[inside] - a)) / (2 * math.pi * s2 * q * x[inside])
    return out


def _finite(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def esd_chart(eigenvalues: np.ndarray, counts: np.ndarray | None, *, title: str,
              mp_q: object = None, mp_s2: object = None, n_spikes: object = None,
              alpha: object = None, pl_xmin: object = None, pl_n_tail: object = None,
              density: Callable[[np.ndarray, float, float], np.ndarray] = marchenko_pastur_density,
              chart_id: str = "esd") -> str:
    """The empirical spectral density as a histogram on log-spaced bins (log-log axes), with
    the fitted Marchenko-Pastur density and the power-law tail where they were fitted."""
    values = np.asarray(eigenvalues, dtype=np.float64)
    weights = np.ones_like(values) if counts is None else np.asarray(counts, dtype=np.float64)
    keep = np.isfinite(values) & (values > 0)
    values, weights = values[keep], weights[keep]
    if values.size == 0:
        return _empty(title, "no positive eigenvalues", chart_id)
    low, high = float(values.min()), float(values.max())
    edges = (np.geomspace(low, high * 1.0001, ESD_BINS + 1) if high > low * 1.0001
             else np.array([low * 0.9, high * 1.1]))
    heights, _ = np.histogram(values, bins=edges, weights=weights)
    total = weights.sum()
    bars = [Bar(float(a), float(b), float(h / total / (b - a)),
                f"[{_number(a)}, {_number(b)}): {round(h)} value(s)")
            for a, b, h in zip(edges[:-1], edges[1:], heights, strict=True) if h > 0]
    grid = np.geomspace(edges[0], edges[-1], 300)
    series = []
    q, s2 = _finite(mp_q), _finite(mp_s2)
    if q is not None and s2 is not None and 0 < q <= 1 and s2 > 0:
        spikes = _finite(n_spikes)
        label = "MP fit" + (f" ({int(spikes)} spikes)" if spikes is not None else "")
        series.append(Series(label, grid, density(grid, q, s2), markers=False))
    a, xmin, n_tail = _finite(alpha), _finite(pl_xmin), _finite(pl_n_tail)
    if a is not None and xmin is not None and xmin > 0 and n_tail is not None:
        tail = grid[grid >= xmin]
        share = n_tail / total
        series.append(Series(f"power law alpha={a:.2f}", tail,
                             share * (a - 1) / xmin * (tail / xmin) ** (-a), dashed=True,
                             markers=False))
    return line_chart(series, title=title, x_label="eigenvalue lambda = sigma^2 / N",
                      y_label="density", log_x=True, log_y=True, chart_id=chart_id, bars=bars)


def values_by_index_chart(values: np.ndarray, counts: np.ndarray | None, *, title: str,
                          lower: float | None = None, upper: float | None = None,
                          chart_id: str = "values") -> str:
    """Singular values in descending order against their index (multiplicities expanded as
    index ranges, long spectra thinned), log y; the stored bounds of sigma_max as dashed lines."""
    sigma = np.asarray(values, dtype=np.float64)
    order = np.argsort(-sigma)
    sigma = sigma[order]
    repeat = (np.ones(sigma.size, dtype=np.int64) if counts is None
              else np.asarray(counts, dtype=np.int64)[order])
    ends = np.cumsum(repeat)
    # Each distinct value spans indices [end - count + 1, end]: its first and last index.
    x = np.column_stack([ends - repeat + 1, ends]).ravel().astype(np.float64)
    y = np.repeat(sigma, 2)
    series = [Series("singular values", x, y, markers=x.size <= 2 * MAX_MARKERS)]
    n = float(ends[-1]) if ends.size else 1.0
    for label, bound in (("upper bound", upper), ("lower bound", lower)):
        value = _finite(bound)
        if value is not None and value > 0:
            series.append(Series(f"{label} {value:.4g}", [1.0, max(n, 2.0)], [value, value],
                                 dashed=True, markers=False))
    return line_chart(series, title=title, x_label="index (descending)", y_label="sigma",
                      log_y=True, chart_id=chart_id)
