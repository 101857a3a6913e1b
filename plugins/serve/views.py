"""What the app's pages and JSON answers hold, read through the Store's public methods.

Each function takes the open ``Store`` and already-checked arguments and returns an HTML
body (built with ``specprof.engine.render``, which escapes every value) or JSON-ready data.
Unknown ids raise ``NotFound``; anything the user can fix raises a ``SpecprofError``.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from specprof.engine.errors import SpecprofError, StoreError
from specprof.engine.jsonable import jsonable
from specprof.engine.render import (
    Link,
    Series,
    block_charts,
    definitions,
    depth_chart,
    escape,
    esd_chart,
    line_chart,
    table,
    values_by_index_chart,
)

if TYPE_CHECKING:
    import pandas as pd

    from specprof.engine.store import Store

RUN_STATUSES = ("running", "complete", "failed", "interrupted")
LAYER_COLUMNS = ["layer_index", "layer", "block", "role", "op_type", "shape", "input_shape", "backend", "kind",
                 "boundary", "status", "n_values", "sigma_max", "sigma_min", "frobenius",
                 "stable_rank", "upper_bound", "lower_bound", "exact", "complete", "seconds",
                 "message"]
RUN_COLUMNS = ["id", "model", "status", "started", "finished", "n_spectra", "n_skipped",
               "n_failed", "error"]
COMPARE_METRICS = ("sigma_max", "alpha", "stable_rank")
MAX_COMPARE = 8
MAX_MODEL_LINES = 10
SPECTRAL = "spectral"


class NotFound(SpecprofError):
    """An id or name the database does not hold (the app answers 404)."""


# --- helpers ---------------------------------------------------------------------------------


def run_link(row: Any) -> str:
    return f"/runs/{int(row['run'] if 'run' in row else row['id'])}"


def model_link(row: Any) -> str:
    return f"/models/{quote(str(row['model']), safe='')}"


def spectrum_link(row: Any) -> str | None:
    if row.get("status") != "ok":
        return None
    return f"/runs/{int(row['run'])}/spectra/{int(row['spectrum_id'])}"


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A frame's rows as JSON-ready dicts (NaN and NA as None, times as ISO text)."""
    return [jsonable(row) for row in frame.to_dict("records")]


def run_info(store: Store, run_id: int) -> dict[str, Any]:
    """``Store.run_info``, with an unknown run as NotFound."""
    try:
        return store.run_info(run_id)
    except StoreError as error:
        if error.message.startswith("no run"):
            raise NotFound(f"no run {run_id}", "see the list of runs at /") from None
        raise


def _frame_text(frame: pd.DataFrame, columns: Sequence[str]) -> list[dict[str, Any]]:
    return frame[[c for c in columns if c in frame.columns]].to_dict("records")


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# --- runs ------------------------------------------------------------------------------------


def runs_frame(store: Store, model: str | None = None, status: str | None = None) -> pd.DataFrame:
    """``Store.runs()``, newest first, of models matching the glob ``model`` and ``status``."""
    if status is not None and status not in RUN_STATUSES:
        raise SpecprofError(f"unknown run status {status!r}",
                            f"choose one of: {', '.join(RUN_STATUSES)}")
    frame = store.runs()
    if model:
        frame = frame[[fnmatch.fnmatchcase(str(name).lower(), model.lower())
                       for name in frame["model"]]]
    if status:
        frame = frame[frame["status"] == status]
    return frame


def runs_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Runs as ``specprof runs --format json`` writes them (times to the second)."""
    frame = frame.copy()
    for column in ("started", "finished"):
        frame[column] = [None if value is None or value != value else value.isoformat(
            sep=" ", timespec="seconds") for value in frame[column]]
    return records(frame)


def index_body(store: Store, model: str | None, status: str | None) -> str:
    frame = runs_frame(store, model, status)
    counts = store.counts()
    options = "".join(f'<option value="{s}"{" selected" if s == status else ""}>{s}</option>'
                      for s in ("", *RUN_STATUSES))
    filters = (f'<form class="inline" method="get" action="/"><label>model (glob) '
               f'<input name="model" value="{escape(model or "")}"></label>'
               f'<label>status <select name="status">{options}</select></label>'
               f'<button type="submit">filter</button></form>')
    compare = ('<form class="inline" method="get" action="/compare"><label>compare runs '
               '<input name="runs" placeholder="e.g. 3,4"></label>'
               '<button type="submit">compare</button></form>')
    summary = definitions({"models": counts["models"], "layers": counts["layers"],
                           "runs": counts["runs"], "layer results": counts["spectra"],
                           "runs shown": len(frame)})
    rows = _frame_text(frame, RUN_COLUMNS)
    return (f"{summary}{filters}{compare}"
            + table(rows, RUN_COLUMNS, "runs-table",
                    links=[Link("id", run_link), Link("model", model_link)]))


# --- one run ---------------------------------------------------------------------------------


def spectral_analysis(store: Store, run_id: int) -> pd.DataFrame:
    """The run's newest stored spectral analysis, one row per layer (empty if none)."""
    frame = store.analyses(run=run_id, analyzer=SPECTRAL)
    if frame.empty:
        return frame
    keys = frame["params"].map(lambda p: json.dumps(p, sort_keys=True))
    newest = keys[frame["analysis_id"].idxmax()]
    return frame[keys == newest].sort_values("layer_index")


def run_body(store: Store, run_id: int, where: str | None, sort: str | None) -> tuple[str, str]:
    """(title, body) of the page of one run."""
    info = run_info(store, run_id)
    layers = store.query(run=run_id, where=where or None, sort=sort or None)
    ok = layers[layers["status"] == "ok"]
    # block and role (checkpoints) where the store has them and any layer has a value
    shown = [c for c in LAYER_COLUMNS if c in layers.columns
             and (c not in ("block", "role") or layers[c].notna().any())]
    summary = {"model": info["model"], "run": run_id, "status": info["status"],
               "started": info["started_at"], "finished": info["finished_at"],
               "host": info["host"], "layer results": len(layers)}
    if info.get("error"):
        summary["error"] = info["error"]
    filter_form = (
        f'<form class="inline" method="get" action="/runs/{run_id}">'
        f'<label>where <input name="where" size="40" value="{escape(where or "")}" '
        'placeholder="sigma_max &gt; 3 and stable_rank &lt; 10"></label>'
        f'<label>sort <input name="sort" size="14" value="{escape(sort or "")}" '
        'placeholder="-sigma_max"></label><button type="submit">apply</button>'
        '<label>find <input type="search" data-filter="layers-table"></label></form>')
    charts = [depth_chart(ok, "sigma_max", f"sigma_max by depth, run {run_id}",
                          ("kind", "backend"), "{backend} ({kind})", "sigma-max-by-depth")]
    analysis = spectral_analysis(store, run_id)
    if not analysis.empty and "alpha" in analysis.columns:
        analysis = analysis.assign(kind=analysis["params"].map(lambda p: p.get("kind", "?")))
        charts.append(depth_chart(analysis, "alpha", f"power-law alpha by depth, run {run_id}",
                                  ("kind",), "alpha ({kind})", "alpha-by-depth", log_y=False))
    else:
        charts.append('<p class="note">No spectral analysis stored for this run: alpha and '
                      "the Marchenko-Pastur fits appear after <code>specprof analyze --run "
                      f"{run_id}</code>.</p>")
    charts += block_charts(ok, analysis, run_id)
    body = (definitions(summary)
            + f'<p><a href="/api/runs/{run_id}/layers">this table as JSON</a> · '
              f'<a href="{model_link(info)}">every run of this model</a></p>'
            + f"<h2>Layers ({len(layers)})</h2>{filter_form}"
            + '<p class="note">Click a layer for the plots of its spectrum.</p>'
            + table(_frame_text(layers, [*LAYER_COLUMNS, "run", "spectrum_id"]), shown,
                    "layers-table", links=[Link("layer", spectrum_link)])
            + f'<h2>Plots</h2><div class="plots">{"".join(charts)}</div>'
            + f"<h2>Hypergraph class separation</h2>{hypergraph_section(store, run_id)}"
            + "<h2>Run parameters</h2><pre>"
            + escape(json.dumps(info["config"], indent=2, default=str)) + "</pre>"
            + f"<h2>Versions</h2>{definitions(info['versions'])}")
    return f"{info['model']}, run {run_id}", body


HYPERGRAPH_SKIP = {"analysis_id", "run", "model", "analyzer", "params", "created_at"}


def hypergraph_section(store: Store, run_id: int) -> str:
    metrics = store.analyses(run=run_id, analyzer="hypergraph")
    graphs = store.hypergraphs(run=run_id)
    if metrics.empty and graphs.empty:
        return ('<p class="note">No hypergraph analysis stored for this run '
                "(run <code>specprof hypergraph</code>).</p>")
    parts = []
    if not metrics.empty:
        columns = [c for c in metrics.columns if c not in HYPERGRAPH_SKIP
                   and metrics[c].map(lambda v: v is not None and v == v).any()]
        parts.append(table(_frame_text(metrics, columns), columns, "hypergraph-table"))
    if not graphs.empty:
        graphs = graphs.assign(params=graphs["params"].map(lambda p: json.dumps(p, default=str)))
        columns = ["hypergraph_id", "analyzer", "name", "params", "created_at"]
        parts.append(table(_frame_text(graphs, columns), columns, "hypergraph-list"))
    return "".join(parts)


# --- one spectrum ----------------------------------------------------------------------------


def spectrum_row(store: Store, run_id: int, spectrum_id: int) -> dict[str, Any]:
    """The ``Store.query`` row of one result of one run; NotFound when the run has none."""
    run_info(store, run_id)
    frame = store.query(run=run_id)
    found = frame[frame["spectrum_id"] == spectrum_id]
    if found.empty:
        raise NotFound(f"run {run_id} has no layer result {spectrum_id}",
                       f"see the layers of the run at /runs/{run_id}")
    return dict(found.iloc[0].to_dict())


def spectrum_body(store: Store, run_id: int, spectrum_id: int) -> tuple[str, str]:
    row = spectrum_row(store, run_id, spectrum_id)
    title = f"{row['layer']} ({row['kind']}, {row['backend']}), run {run_id}"
    if row["status"] != "ok":
        return title, (f"<p>No values: the layer was {escape(row['status'])} "
                       f"({escape(row['message'] or '')}).</p>")
    spectrum = store.load_spectrum(spectrum_id)
    analysis = spectral_analysis(store, run_id)
    metrics: dict[str, Any] = {}
    if not analysis.empty and "spectrum_id" in analysis.columns:
        match = analysis[analysis["spectrum_id"] == spectrum_id]
        if not match.empty:
            metrics = match.iloc[0].to_dict()
    norm, lam = _finite(metrics.get("spectral_norm")), _finite(metrics.get("lambda_max"))
    if norm and lam:  # the analyzer's normalization: lambda = sigma^2 / N
        scale, note = norm**2 / lam, ""
    else:
        scale = 1.0
        note = ('<p class="note">No spectral analysis of this spectrum is stored, so the ESD '
                "is of sigma^2 (not divided by N) and has no Marchenko-Pastur fit; run "
                f"<code>specprof analyze --run {run_id}</code>.</p>")
    values, counts = spectrum.values, spectrum.multiplicities
    esd = esd_chart(values**2 / scale, counts, title=f"ESD of {row['layer']}",
                    mp_q=metrics.get("mp_q"), mp_s2=metrics.get("mp_s2"),
                    n_spikes=metrics.get("n_spikes"), alpha=metrics.get("alpha"),
                    pl_xmin=metrics.get("pl_xmin"), pl_n_tail=metrics.get("pl_n_tail"))
    by_index = values_by_index_chart(values, counts, title=f"singular values of {row['layer']}",
                                     upper=spectrum.upper_bound, lower=spectrum.lower_bound)
    shown = {k: row.get(k) for k in ("layer", "op_type", "shape", "input_shape", "backend",
                                     "kind", "boundary", "n_values", "sigma_max", "sigma_min",
                                     "stable_rank", "upper_bound", "lower_bound", "exact")}
    shown.update({k: metrics.get(k) for k in ("alpha", "alpha_hat", "n_spikes", "mp_ks")
                  if metrics.get(k) is not None})
    return title, (definitions(shown)
                   + f'<p><a href="/runs/{run_id}">back to run {run_id}</a> · '
                     f'<a href="/api/spectra/{spectrum_id}">values as JSON</a></p>'
                   + note + f'<div class="plots">{esd}{by_index}</div>')


def spectrum_json(store: Store, spectrum_id: int) -> dict[str, Any]:
    try:
        spectrum = store.load_spectrum(spectrum_id)
    except StoreError as error:
        if error.message.startswith("no spectrum") or " has no values" in error.message:
            raise NotFound(error.message, error.hint) from None
        raise
    return jsonable({
        "spectrum_id": spectrum_id, "kind": spectrum.kind, "backend": spectrum.backend,
        "exact": spectrum.exact, "boundary": spectrum.boundary, "complete": spectrum.complete,
        "n_values": spectrum.n_values, "upper_bound": spectrum.upper_bound,
        "lower_bound": spectrum.lower_bound, "values": spectrum.values,
        "multiplicities": spectrum.multiplicities})


# --- comparing runs --------------------------------------------------------------------------


def parse_runs(text: Sequence[str]) -> list[int]:
    """Run ids from ``runs=3,4`` or ``runs=3&runs=4``: 2 to MAX_COMPARE positive integers."""
    parts = [p.strip() for item in text for p in item.split(",") if p.strip()]
    if not all(p.isdigit() and len(p) < 19 and int(p) > 0 for p in parts):
        raise SpecprofError(f"runs must be run ids separated by commas, not {','.join(parts)!r}",
                            "e.g. /compare?runs=3,4")
    ids = list(dict.fromkeys(int(p) for p in parts))
    if not 2 <= len(ids) <= MAX_COMPARE:
        raise SpecprofError(f"compare needs 2 to {MAX_COMPARE} different runs, got {len(ids)}",
                            "e.g. /compare?runs=3,4")
    return ids


def comparison(store: Store, run_ids: Sequence[int]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per (layer position, layer, kind): each run's sigma_max, alpha and stable rank
    (an exact result preferred where a run has several), and sigma_max's relative change
    from the first run to the last; and the runs' model names."""
    import pandas as pd

    models, parts = [], []
    for run_id in run_ids:
        models.append(str(run_info(store, run_id)["model"]))
        frame = store.query(run=run_id)
        frame = frame[frame["status"] == "ok"].sort_values(["exact", "spectrum_id"],
                                                           ascending=[False, True])
        frame = frame.drop_duplicates(["layer_index", "layer", "kind"])
        analysis = spectral_analysis(store, run_id)
        if not analysis.empty and "alpha" in analysis.columns:
            alphas = analysis.set_index("spectrum_id")["alpha"]
            frame = frame.assign(alpha=frame["spectrum_id"].map(alphas))
        else:
            frame = frame.assign(alpha=math.nan)
        parts.append(frame.assign(run=run_id))
    parts = [part for part in parts if not part.empty]
    data = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["layer_index", "layer", "kind", "run", "backend", *COMPARE_METRICS])
    rows: dict[tuple[int, str, str], dict[str, Any]] = {}
    for record in data.to_dict("records"):
        key = (int(record["layer_index"]), str(record["layer"]), str(record["kind"]))
        row = rows.setdefault(key, {"layer_index": key[0], "layer": key[1], "kind": key[2],
                                    "runs": {}})
        row["runs"][int(record["run"])] = {"backend": record["backend"],
                                           **{m: _finite(record.get(m)) for m in COMPARE_METRICS}}
    first, last = run_ids[0], run_ids[-1]
    for row in rows.values():
        a, b = (row["runs"].get(first, {}).get("sigma_max"),
                row["runs"].get(last, {}).get("sigma_max"))
        row["sigma_max_change"] = (b - a) / a if a and b is not None else None
    return [rows[key] for key in sorted(rows)], models


def compare_body(store: Store, run_ids: Sequence[int]) -> tuple[str, str]:
    rows, models = comparison(store, run_ids)
    columns = ["layer_index", "layer", "kind"]
    flat = []
    for row in rows:
        item = {k: row[k] for k in columns}
        for run_id in run_ids:
            for metric in COMPARE_METRICS:
                item[f"{metric} @{run_id}"] = row["runs"].get(run_id, {}).get(metric)
        item["sigma_max change"] = row["sigma_max_change"]
        flat.append(item)
    metric_columns = [f"{m} @{r}" for m in COMPARE_METRICS for r in run_ids]
    series = []
    for run_id in run_ids:
        for kind in sorted({row["kind"] for row in rows}):
            points = [(row["layer_index"], row["runs"][run_id]["sigma_max"]) for row in rows
                      if row["kind"] == kind and run_id in row["runs"]]
            if points:
                series.append(Series(f"run {run_id} ({kind})", [p[0] for p in points],
                                     [p[1] if p[1] is not None else math.nan for p in points]))
    chart = line_chart(series, title="sigma_max by depth, per run", x_label="layer position",
                       y_label="sigma_max", log_y=True, chart_id="compare-sigma-max")
    names = sorted(set(models))
    note = ("" if len(names) == 1 else
            f'<p class="note">These runs are of different models ({escape(", ".join(names))}): '
            "layers are matched by position, name and spectrum kind.</p>")
    runs_list = " · ".join(f'<a href="/runs/{r}">run {r}</a> ({escape(m)})'
                           for r, m in zip(run_ids, models, strict=True))
    body = (f"<p>{runs_list}</p>{note}"
            f'<p><a href="/api/compare?{urlencode({"runs": ",".join(map(str, run_ids))})}">'
            "this comparison as JSON</a></p>"
            '<form class="inline"><label>find <input type="search" data-filter="compare-table">'
            "</label></form>"
            + table(flat, [*columns, *metric_columns, "sigma_max change"], "compare-table")
            + '<p class="note">sigma_max change: relative, from the first run listed to the '
              f'last.</p><div class="plots">{chart}</div>')
    return f"compare runs {', '.join(map(str, run_ids))}", body


# --- one model -------------------------------------------------------------------------------


def model_body(store: Store, name: str) -> tuple[str, str]:
    frame = store.runs()
    frame = frame[frame["model"] == name]
    if frame.empty:
        raise NotFound(f"no runs of a model named {name!r}", "see the list of runs at /")
    ids = [int(i) for i in frame["id"]]
    spectra = store.query(model=name)
    spectra = spectra[(spectra["model"] == name) & (spectra["status"] == "ok")]
    recent = spectra[spectra["run"].isin(ids[:MAX_MODEL_LINES])]
    chart = depth_chart(recent, "sigma_max", f"sigma_max by depth, newest {MAX_MODEL_LINES} runs",
                        ("run", "kind", "backend"), "run {run} {backend}", "model-sigma-max")
    newest = spectra.groupby("run")["sigma_max"].max()
    over_time = line_chart([Series("largest sigma_max", [float(r) for r in newest.index],
                                   newest.astype(float).tolist())],
                           title="largest sigma_max of each run", x_label="run id",
                           y_label="sigma_max", log_y=True, chart_id="model-over-time")
    compare = ""
    if len(ids) >= 2:
        chosen = ",".join(str(i) for i in sorted(ids[:MAX_COMPARE]))
        compare = (f'<p><a href="/compare?{urlencode({"runs": chosen})}">compare the newest '
                   f"{min(len(ids), MAX_COMPARE)} runs</a></p>")
    body = (compare + table(_frame_text(frame, RUN_COLUMNS), RUN_COLUMNS, "model-runs",
                            links=[Link("id", run_link)])
            + f'<div class="plots">{over_time}{chart}</div>')
    return f"model {name}", body
