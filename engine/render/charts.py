"""Charts of a run's layers by depth or by transformer block, from the store's query frames.

Shared by ``specprof report`` and ``specprof serve``: ``depth_chart`` draws one metric against
the layer position (or another column), one line per group; ``block_charts`` draws sigma_max
and alpha by transformer block, one line per role, for checkpoint runs whose layers carry
``block`` and ``role``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from specprof.engine.render.svg import Series, line_chart

if TYPE_CHECKING:
    import pandas as pd


def depth_chart(frame: pd.DataFrame, metric: str, title: str, group: Sequence[str],
                label: str, chart_id: str, log_y: bool = True, x: str = "layer_index",
                x_label: str = "layer position") -> str:
    """``metric`` by layer position (or by ``x``, e.g. the transformer block), one line per
    ``group`` (formatted into ``label``)."""
    series = []
    columns = [metric, x]
    data = frame.dropna(subset=columns) if set(columns) <= set(frame.columns) else frame.iloc[0:0]
    for keys, part in data.groupby(list(group), sort=True):
        values = dict(zip(group, keys if isinstance(keys, tuple) else (keys,), strict=True))
        part = part.sort_values([x, "layer_index"])
        series.append(Series(label.format(**values), part[x].astype(float).tolist(),
                             part[metric].astype(float).tolist()))
    return line_chart(series, title=title, x_label=x_label, y_label=metric,
                      log_y=log_y, chart_id=chart_id)


def block_charts(ok: pd.DataFrame, analysis: pd.DataFrame, run_id: int) -> list[str]:
    """sigma_max and alpha by transformer block, one line per role, for checkpoint runs (whose
    layers carry ``block`` and ``role``); none for other runs."""
    if "block" not in ok.columns or not ok["block"].notna().any():
        return []
    charts = [depth_chart(ok, "sigma_max", f"sigma_max by block and role, run {run_id}",
                          ("role",), "{role}", "sigma-max-by-block", x="block", x_label="block")]
    if not analysis.empty and "alpha" in analysis.columns:
        names = ok.drop_duplicates("layer_index").set_index("layer_index")
        with_blocks = analysis.assign(
            block=analysis["layer_index"].map(names["block"]),
            role=analysis["layer_index"].map(names["role"]))
        charts.append(depth_chart(with_blocks, "alpha", f"power-law alpha by block and role, "
                                  f"run {run_id}", ("role",), "{role}", "alpha-by-block",
                                  log_y=False, x="block", x_label="block"))
    return charts
