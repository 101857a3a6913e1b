"""Plots of the spectral analysis, as inline SVG drawn by ``specprof.engine.render``.

The report and ``specprof serve`` share the drawing code (``engine/render/svg.py``); this
module turns the analyzer's frames into its series. No plotting library is needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from specprof.engine.render import Series, esd_chart, line_chart
from specprof.plugins.analyzers import rmt

if TYPE_CHECKING:
    import pandas as pd


def esd_plot(eigenvalues: np.ndarray, counts: np.ndarray | None, metrics: dict[str, Any],
             title: str, chart_id: str = "esd") -> str:
    """The ESD histogram (log-log) with the fitted MP density (the analyzer's own formula)
    and the power-law tail, where the analysis fitted them."""
    return esd_chart(eigenvalues, counts, title=title, mp_q=metrics.get("mp_q"),
                     mp_s2=metrics.get("mp_s2"), n_spikes=metrics.get("n_spikes"),
                     alpha=metrics.get("alpha"), pl_xmin=metrics.get("pl_xmin"),
                     pl_n_tail=metrics.get("pl_n_tail"), density=rmt.mp_pdf, chart_id=chart_id)


def sigma_max_by_depth(frame: pd.DataFrame, title: str = "sigma_max by depth") -> str:
    """sigma_max per layer position, one line per (kind, backend) of a run's spectra
    (``frame``: ``Store.query`` rows, ok ones); several backends = their comparison."""
    ok = frame[frame["status"] == "ok"]
    series = [Series(f"{backend} ({kind})", group["layer_index"].astype(float).tolist(),
                     group["sigma_max"].astype(float).tolist())
              for (kind, backend), group in ok.sort_values("layer_index")
              .groupby(["kind", "backend"])]
    return line_chart(series, title=title, x_label="layer position", y_label="sigma_max",
                      log_y=True, chart_id="sigma-max-by-depth")


def backend_comparison(frame: pd.DataFrame) -> str | None:
    """Relative difference of each operator backend's sigma_max from the exact one's, per
    layer; None when the run has no exact operator spectra and another operator backend."""
    ok = frame[(frame["status"] == "ok") & (frame["kind"] == "operator")]
    exact = ok[ok["exact"].astype(bool)].groupby("layer_index")["sigma_max"].first()
    others = ok[~ok["exact"].astype(bool)]
    if exact.empty or others.empty:
        return None
    series = []
    for backend, group in others.groupby("backend"):
        joined = group.set_index("layer_index")["sigma_max"].to_frame("approx").join(
            exact.rename("exact"), how="inner").sort_index()
        error = (joined["approx"] - joined["exact"]) / joined["exact"] * 100
        series.append(Series(str(backend), joined.index.astype(float).tolist(),
                             error.astype(float).tolist()))
    return line_chart(series, title="backends against the exact operator spectrum",
                      x_label="layer position", y_label="sigma_max error vs exact (%)",
                      chart_id="backend-comparison")


def runs_comparison(frame: pd.DataFrame, metric: str, title: str) -> str | None:
    """``metric`` by layer position, one line per run (training checkpoints of one model);
    None with fewer than two runs that have it."""
    if metric not in frame.columns:
        return None
    data = frame[["run", "layer_index", metric]].dropna()
    if data["run"].nunique() < 2:
        return None
    series = [Series(f"run {run}", group["layer_index"].astype(float).tolist(),
                     group[metric].astype(float).tolist())
              for run, group in sorted(data.sort_values("layer_index").groupby("run"),
                                       key=lambda item: item[0])]
    return line_chart(series, title=title, x_label="layer position", y_label=metric,
                      chart_id=f"runs-{metric}")
