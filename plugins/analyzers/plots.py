"""Plots of the spectral analysis, rendered headless to PNG bytes.

matplotlib is imported inside each function and used through ``Figure`` + the Agg canvas
directly, never ``pyplot``: no global figure state, no display needed, safe in threads.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from specprof.plugins.analyzers import rmt

if TYPE_CHECKING:
    import pandas as pd

FIGSIZE = (6.4, 3.6)
DPI = 90


def _figure() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        from specprof.engine.errors import MissingExtraError

        raise MissingExtraError("plotting the report", "analysis") from error
    return Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")


def _png(figure: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _count(value: Any) -> str:
    number = _finite(value)
    return "?" if number is None else str(int(number))


def _integer_x(axes: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def esd_plot(eigenvalues: np.ndarray, counts: np.ndarray | None, metrics: dict[str, Any],
             title: str) -> bytes:
    """The ESD as a density histogram on log-spaced bins (log-log axes), with the fitted MP
    density and the power-law tail ``p(x) = (n_tail / n) (alpha - 1) / xmin (x / xmin)^-alpha``
    drawn where they were fitted."""
    values = np.asarray(eigenvalues, dtype=np.float64)
    weights = np.ones_like(values) if counts is None else np.asarray(counts, dtype=np.float64)
    keep = values > 0
    values, weights = values[keep], weights[keep]
    figure = _figure()
    axes = figure.add_subplot()
    axes.set_title(title, fontsize=9)
    if values.size == 0:
        axes.text(0.5, 0.5, "no positive eigenvalues", ha="center", transform=axes.transAxes)
        return _png(figure)
    low, high = values.min(), values.max()
    bins = np.geomspace(low, high * 1.0001, 40) if high > low * 1.0001 else np.array([low * 0.9, high * 1.1])
    axes.hist(values, bins=bins, weights=weights, density=True, color="#9bb7d4", label="ESD")
    grid = np.geomspace(bins[0], bins[-1], 400)
    q, s2 = _finite(metrics.get("mp_q")), _finite(metrics.get("mp_s2"))
    if q is not None and s2 is not None:
        axes.plot(grid, rmt.mp_pdf(grid, q, s2), color="#d62728", lw=1.4,
                  label=f"MP fit ({_count(metrics.get('n_spikes'))} spikes)")
    alpha, xmin, n_tail = (_finite(metrics.get(k)) for k in ("alpha", "pl_xmin", "pl_n_tail"))
    if alpha is not None and xmin is not None and n_tail is not None:
        tail = grid[grid >= xmin]
        share = n_tail / weights.sum()
        axes.plot(tail, share * (alpha - 1) / xmin * (tail / xmin) ** (-alpha), color="#2ca02c",
                  lw=1.4, ls="--", label=f"power law alpha={alpha:.2f}")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("eigenvalue lambda = sigma^2 / N")
    axes.set_ylabel("density")
    axes.legend(fontsize=7)
    return _png(figure)


def sigma_max_by_depth(frame: pd.DataFrame, title: str = "sigma_max by depth") -> bytes:
    """sigma_max per layer position, one line per (kind, backend) of a run's spectra
    (``frame``: ``Store.query`` rows, ok ones); several backends = their comparison."""
    figure = _figure()
    axes = figure.add_subplot()
    ok = frame[frame["status"] == "ok"]
    for (kind, backend), group in ok.groupby(["kind", "backend"]):
        group = group.sort_values("layer_index")
        axes.plot(group["layer_index"], group["sigma_max"], marker="o", ms=3,
                  label=f"{backend} ({kind})")
    axes.set_yscale("log")
    axes.set_xlabel("layer position")
    _integer_x(axes)
    axes.set_ylabel("sigma_max")
    axes.set_title(title, fontsize=9)
    if len(ok):
        axes.legend(fontsize=7)
    return _png(figure)


def backend_comparison(frame: pd.DataFrame) -> bytes | None:
    """Relative difference of each operator backend's sigma_max from the exact one's, per
    layer; None when the run has no exact operator spectra and another operator backend."""
    ok = frame[(frame["status"] == "ok") & (frame["kind"] == "operator")]
    exact = ok[ok["exact"].astype(bool)].groupby("layer_index")["sigma_max"].first()
    others = ok[~ok["exact"].astype(bool)]
    if exact.empty or others.empty:
        return None
    figure = _figure()
    axes = figure.add_subplot()
    for backend, group in others.groupby("backend"):
        joined = group.set_index("layer_index")["sigma_max"].to_frame("approx").join(
            exact.rename("exact"), how="inner").sort_index()
        axes.plot(joined.index, (joined["approx"] - joined["exact"]) / joined["exact"] * 100,
                  marker="o", ms=3, label=str(backend))
    axes.axhline(0, color="grey", lw=0.8)
    axes.set_xlabel("layer position")
    _integer_x(axes)
    axes.set_ylabel("sigma_max error vs exact (%)")
    axes.set_title("backends against the exact operator spectrum", fontsize=9)
    axes.legend(fontsize=7)
    return _png(figure)


def runs_comparison(frame: pd.DataFrame, metric: str, title: str) -> bytes | None:
    """``metric`` by layer position, one line per run (training checkpoints of one model);
    None with fewer than two runs that have it."""
    if metric not in frame.columns:
        return None
    data = frame[["run", "layer_index", metric]].dropna()
    if data["run"].nunique() < 2:
        return None
    figure = _figure()
    axes = figure.add_subplot()
    for run, group in sorted(data.groupby("run"), key=lambda item: item[0]):
        group = group.sort_values("layer_index")
        axes.plot(group["layer_index"], group[metric].astype(float), marker="o", ms=3,
                  label=f"run {run}")
    axes.set_xlabel("layer position")
    _integer_x(axes)
    axes.set_ylabel(metric)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7)
    return _png(figure)
