"""``specprof report``: one self-contained HTML file about one stored run.

Everything is inline (CSS, a few lines of JS to sort the table, plots as SVG), so the file can
be mailed or archived and opens offline. Its pieces (escaping, tables, page, plots) are
``specprof.engine.render``'s, which ``specprof serve`` uses too. The spectral analysis is
read from the store; if the run has none yet it is computed (and stored) first.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from specprof.engine.errors import SpecprofError
from specprof.engine.render import block_charts, definitions, escape, page, table

if TYPE_CHECKING:
    import pandas as pd

    from specprof.engine.store import Store

SPECTRAL = "spectral"
"""The analyzer whose stored results the report shows (and runs when there are none)."""
MAX_ESD_PLOTS = 24
"""ESD histograms drawn at most (the first layers by position), to keep the file small."""

TABLE_COLUMNS = ["layer", "description", "kind", "backend", "n_values", "alpha", "alpha_hat",
                 "pl_ks", "n_spikes", "mp_ks", "stable_rank", "spectral_norm",
                 "spectral_norm_bracket", "layer_bound",
                 "lipschitz_bound", "rand_alpha", "rand_n_spikes", "notes"]
HYPERGRAPH_SKIP = {"analysis_id", "run", "model", "analyzer", "params", "created_at"}


# --- formatting ----------------------------------------------------------------------------------


def html_table(frame: pd.DataFrame, columns: list[str], table_id: str) -> str:
    """A sortable HTML table of ``frame``'s ``columns`` (those it has)."""
    columns = [c for c in columns if c in frame.columns]
    return table(frame[columns].to_dict("records"), columns, table_id)


# --- content -------------------------------------------------------------------------------------


def spectral_rows(store: Store, run_id: int, kind: str | None) -> pd.DataFrame:
    """The run's stored spectral analysis (of ``kind``, else the newest one); computed and
    stored now when there is none."""
    def stored() -> pd.DataFrame:
        frame = store.analyses(run=run_id, analyzer=SPECTRAL)
        if frame.empty:
            return frame
        keys = frame["params"].map(lambda p: json.dumps(p, sort_keys=True))
        if kind is not None:
            return frame[frame["params"].map(lambda p: p.get("kind") == kind)]
        newest = keys[frame["analysis_id"].idxmax()]
        return frame[keys == newest]

    frame = stored()
    if frame.empty:
        from specprof.engine.base import AnalysisContext
        from specprof.engine.plugins import get_registry

        analyzer = get_registry().analyzer(SPECTRAL)
        analyzer.analyze(AnalysisContext(store=store, options={"kind": kind}), run_id)
        frame = stored()
    return frame.sort_values("layer_index").reset_index(drop=True)


def bracket_text(sigma: float, lower: float, upper: float) -> str:
    """``[lower, upper] ±x%``: the certified bracket of a sigma_max and how far ``sigma`` can
    be from the truth inside it, relative to it (the larger distance to either end); '' when
    the backend gave no bracket."""
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in (sigma, lower, upper)) \
            or sigma <= 0:
        return ""
    error = max(upper - sigma, sigma - lower) / sigma
    percent = "<0.01%" if error < 1e-4 else f"{100 * error:.2g}%"
    return f"[{lower:.4g}, {upper:.4g}] ±{percent}"


def with_brackets(rows: pd.DataFrame, spectra: pd.DataFrame) -> pd.DataFrame:
    """``rows`` (one per stored spectrum, by ``spectrum_id``) with ``spectral_norm_bracket``
    from the stored spectra's certified bounds (``bracket_text``)."""
    if "spectrum_id" not in rows or spectra.empty:
        return rows.assign(spectral_norm_bracket="")
    by_id = {int(record["spectrum_id"]): bracket_text(record["sigma_max"], record["lower_bound"],
                                                      record["upper_bound"])
             for record in spectra.to_dict("records")}
    texts = [by_id.get(int(s), "") if s == s and s is not None else ""
             for s in rows["spectrum_id"]]
    return rows.assign(spectral_norm_bracket=texts)


def _esd_section(store: Store, run_id: int, rows: pd.DataFrame) -> str:
    from specprof.plugins.analyzers import plots
    from specprof.plugins.analyzers.shapes import matrix_shape

    wanted = {int(s): record for s, record in zip(rows["spectrum_id"], rows.to_dict("records"),
                                                  strict=True) if s == s and s is not None}
    images: list[str] = []
    for layer_row, spectrum in store.spectra_for_run(run_id):
        record = wanted.get(int(layer_row["spectrum_id"]))
        if record is None or len(images) >= MAX_ESD_PLOTS:
            continue
        shape = matrix_shape(layer_row, spectrum)
        scale = float(max(shape)) if shape is not None else 1.0
        title = (f"{layer_row['name']} ({spectrum.kind}, {spectrum.backend})"
                 + ("" if shape is not None else ": unnormalized, shape unknown"))
        images.append(plots.esd_plot(spectrum.values**2 / scale, spectrum.multiplicities, record,
                                     title, chart_id=f"esd-{len(images)}"))
    more = len(wanted) - len(images)
    note = f'<p class="note">{more} more layer(s) not drawn.</p>' if more > 0 else ""
    return f'<div class="plots" id="esd-plots">{"".join(images)}</div>{note}'


def _plots_section(store: Store, run_id: int, model: str, kind: str) -> str:
    from specprof.plugins.analyzers import plots

    spectra = store.query(run=run_id)
    images = [plots.sigma_max_by_depth(spectra, f"sigma_max by depth, run {run_id}")]
    compared = plots.backend_comparison(spectra)
    if compared is not None:
        images.append(compared)
    history = store.query(model=model, kind=kind)
    history = history[history["status"] == "ok"].drop_duplicates(["run", "layer_index"])
    across = plots.runs_comparison(history, "sigma_max", f"sigma_max across runs of {model} ({kind})")
    if across is not None:
        images.append(across)
    alphas = store.analyses(model=model, analyzer="spectral")
    if not alphas.empty:
        alphas = alphas[alphas["params"].map(lambda p: p.get("kind") == kind)]
        across_alpha = plots.runs_comparison(alphas, "alpha", f"alpha across runs of {model} ({kind})")
        if across_alpha is not None:
            images.append(across_alpha)
    return f'<div class="plots" id="plots">{"".join(images)}</div>'


def _blocks_section(store: Store, run_id: int, rows: pd.DataFrame) -> str:
    """For checkpoint runs (layers with a transformer ``block`` and ``role``): one line per
    role of layers, median alpha and sigma_max, and both by block, one line per role; '' for
    other runs."""
    layers = store.query(run=run_id)
    ok = layers[layers["status"] == "ok"] if "status" in layers else layers
    charts = block_charts(ok, rows, run_id)
    if not charts:
        return ""
    by_index = ok.drop_duplicates("layer_index").set_index("layer_index")
    merged = rows.assign(role=rows["layer_index"].map(by_index["role"]),
                         block=rows["layer_index"].map(by_index["block"]),
                         sigma_max=rows["layer_index"].map(by_index["sigma_max"]))
    summary = (merged.groupby(merged["role"].fillna("other"))
               .agg(layers=("layer_index", "size"), blocks=("block", "nunique"),
                    median_alpha=("alpha", "median"), median_sigma_max=("sigma_max", "median"),
                    max_sigma_max=("sigma_max", "max"))
               .reset_index())
    columns = ["role", "layers", "blocks", "median_alpha", "median_sigma_max", "max_sigma_max"]
    return (f"<h2>By transformer block and role</h2>{html_table(summary, columns, 'roles-table')}"
            f'<div class="plots" id="block-plots">{"".join(charts)}</div>')


def _hypergraph_section(store: Store, run_id: int) -> str:
    metrics = store.analyses(run=run_id, analyzer="hypergraph")
    graphs = store.hypergraphs(run=run_id)
    if metrics.empty and graphs.empty:
        return '<p class="note">No hypergraph analysis stored for this run ' \
               "(run <code>specprof hypergraph</code>).</p>"
    parts = []
    if not metrics.empty:
        columns = [c for c in metrics.columns if c not in HYPERGRAPH_SKIP
                   and metrics[c].map(lambda v: v is not None and v == v).any()]
        parts.append(html_table(metrics, columns, "hypergraph-table"))
    if not graphs.empty:
        parts.append(html_table(graphs, ["hypergraph_id", "analyzer", "name", "params",
                                         "created_at"], "hypergraph-list"))
    return "".join(parts)


def build_report(store: Store, run_id: int, kind: str | None = None) -> str:
    """The report of run ``run_id`` as one HTML string."""
    info = store.run_info(run_id)
    rows = spectral_rows(store, run_id, kind)
    if rows.empty:
        raise SpecprofError(f"run {run_id} has no spectral analysis of {kind} spectra",
                            "run: specprof analyze --run ID --spectrum KIND")
    chosen = str(rows["kind"].iloc[0])
    rows = with_brackets(rows, store.query(run=run_id))
    layer_rows = store.layers(info["model_id"])
    n_weights = int(sum(math.prod(shape) for shape in layer_rows["weight_shape"]))
    bound = (rows["lipschitz_bound"].iloc[-1]
             if "lipschitz_bound" in rows and len(rows) else None)
    summary = {
        "model": info["model"], "run": run_id, "status": info["status"],
        "linear layers": len(layer_rows), "weights in linear layers": f"{n_weights:,}",
        "spectrum kind analyzed": chosen,
        "Lipschitz upper bound (product of layer norms)": bound,
        "started": info["started_at"], "finished": info["finished_at"], "host": info["host"],
    }
    if info.get("error"):
        summary["error"] = info["error"]
    baseline = ("shuffled-weights baseline included (rand_* columns)"
                if rows.get("rand_alpha") is not None and rows["rand_alpha"].notna().any()
                else "no shuffled-weights baseline (it needs the model file: "
                     "specprof analyze MODEL_FILE)")
    title = f"specprof report: {info['model']}, run {run_id}"
    body = f"""<h2>Model summary</h2>{definitions(summary)}
<p class="note">The Lipschitz bound multiplies the layers' operator-norm bounds in order; it
assumes a plain chain of these layers with 1-Lipschitz activations (ReLU) and ignores residual
connections and normalization layers. {escape(baseline)}.</p>
<h2>Layers ({len(rows)}, {escape(chosen)} spectra)</h2>
{html_table(rows, TABLE_COLUMNS, "layers-table")}
<p class="note">spectral_norm_bracket: the backend's certified bounds on sigma_max and how far
the reported value can be from the true one inside them (empty where the backend computed it
exactly or gave no bounds). Where a toeplitz approximation's bracket is too wide for you,
profile again with --backend exact.</p>
<h2>Plots</h2>{_plots_section(store, run_id, info["model"], chosen)}
{_blocks_section(store, run_id, rows)}
<h2>Empirical spectral densities</h2>{_esd_section(store, run_id, rows)}
<h2>Hypergraph class separation</h2>{_hypergraph_section(store, run_id)}
<h2>Run parameters</h2><pre>{escape(json.dumps(info["config"], indent=2, default=str))}</pre>
<h2>Versions</h2>{definitions(info["versions"])}"""
    return page(title, body)


def write_report(store: Store, run_id: int, path: str | Path, kind: str | None = None) -> Path:
    """Write the report of ``run_id`` to ``path``; returns the path written."""
    target = Path(path)
    content = build_report(store, run_id, kind)
    try:
        target.write_text(content, encoding="utf-8")
    except OSError as error:
        raise SpecprofError(f"cannot write the report to {target}: {error.strerror}",
                            "choose another -o path") from error
    return target
