"""The ``spectral`` analyzer: random-matrix diagnostics of every layer of a stored run.

It reads one kind of spectrum (operator or filter, chosen and labelled) from the store, fits
each layer's ESD (``specprof.plugins.analyzers.rmt``), bounds the network's Lipschitz constant
by the product of the layers' norms, optionally compares each layer with its weights shuffled,
and writes the metrics back (``analyses`` table). It also adds the ``specprof analyze`` and
``specprof report`` commands.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import click

from specprof.engine import hookimpl
from specprof.engine.base import AnalysisContext, Analyzer
from specprof.engine.cli_common import DB_OPTION, console
from specprof.engine.errors import SpecprofError, StoreError
from specprof.engine.types import Layer, LoadedModel, Request, Spectrum
from specprof.plugins.analyzers import rmt
from specprof.plugins.analyzers.shapes import layer_norm_bound, matrix_shape

if TYPE_CHECKING:
    import pandas as pd

    from specprof.engine.plugins import Registry
    from specprof.engine.store import Store

ANALYZER = "spectral"
KINDS = ("operator", "filter")
DEFAULT_SEED = 0
NO_BASELINE = "shuffled baseline needs the weights: pass the MODEL file to 'specprof analyze'"

COLUMNS = [
    "layer", "layer_index", "op_type", "description", "kind", "backend", "exact", "spectrum_id",
    "n_values", "alpha", "alpha_sigma", "alpha_hat", "pl_xmin", "pl_ks", "pl_n_tail",
    "n_spikes", "mp_q", "mp_s2", "mp_lambda_plus", "mp_ks", "lambda_max", "stable_rank",
    "spectral_norm", "frobenius_norm", "layer_bound", "lipschitz_bound", "rand_alpha",
    "rand_n_spikes", "rand_spectral_norm", "notes",
]
INT_COLUMNS = ("n_spikes", "pl_n_tail", "rand_n_spikes")
TABLE_COLUMNS = ["layer", "backend", "n_values", "alpha", "alpha_hat", "n_spikes", "mp_ks",
                 "stable_rank", "spectral_norm", "lipschitz_bound", "rand_alpha"]


# --- what a layer's matrix is --------------------------------------------------------------------


# --- the analyzer ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpectralOptions:
    """What ``SpectralAnalyzer.analyze`` accepts in its ``options`` dict."""

    kind: str | None = None
    """operator or filter; None: operator if the run has any, else filter."""
    backend: str | None = None
    """Only spectra of this backend; None: per layer, an exact one if stored, else the first."""
    model: LoadedModel | None = None
    """The run's model with its weights: enables the shuffled-weights baseline."""
    seed: int = DEFAULT_SEED
    store_results: bool = True

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> SpectralOptions:
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            raise SpecprofError(f"unknown spectral analyzer option(s): {', '.join(sorted(unknown))}",
                                f"use: {', '.join(cls.__dataclass_fields__)}")
        return cls(**options)


def run_kinds(store: Store, run_id: int) -> dict[str, list[str]]:
    """Spectrum kinds with ok results in a run, each with its backends."""
    frame = store.query(run=run_id)
    frame = frame[frame["status"] == "ok"]
    return {kind: sorted(set(group["backend"])) for kind, group in frame.groupby("kind")}


def choose_kind(store: Store, run_id: int, kind: str | None) -> str:
    """The spectrum kind to analyze: the one asked for (it must be in the run), else operator
    when the run has operator spectra, else filter."""
    kinds = run_kinds(store, run_id)
    if kind is not None:
        if kind not in kinds:
            have = ", ".join(f"{k} ({', '.join(b)})" for k, b in kinds.items()) or "no spectra"
            raise SpecprofError(f"run {run_id} has no {kind} spectra (it has {have})",
                                f"profile the model with a {kind} backend, or pass --spectrum "
                                f"{'filter' if kind == 'operator' else 'operator'}")
        return kind
    for candidate in KINDS:
        if candidate in kinds:
            return candidate
    raise SpecprofError(f"run {run_id} has no stored spectra to analyze",
                        "see 'specprof query --run ID' for why its layers were skipped")


def _pick_spectra(pairs: list[tuple[dict[str, Any], Spectrum]]) -> list[tuple[dict[str, Any], Spectrum]]:
    """One spectrum per layer: the exact one when several backends were run, else the first."""
    chosen: dict[int, tuple[dict[str, Any], Spectrum]] = {}
    for row, spectrum in pairs:
        current = chosen.get(row["id"])
        if current is None or (spectrum.exact and not current[1].exact):
            chosen[row["id"]] = (row, spectrum)
    return sorted(chosen.values(), key=lambda pair: pair[0]["index"])


class SpectralAnalyzer(Analyzer):
    """Per-layer RMT diagnostics (ESD, MP fit, power-law alpha) and a Lipschitz bound."""

    name: ClassVar[str] = ANALYZER
    description: ClassVar[str] = (
        "random-matrix diagnostics per layer: MP bulk fit and spikes, power-law alpha and "
        "alpha-hat, stable rank, norms, shuffled-weights baseline, product-of-norms Lipschitz bound"
    )
    requires: ClassVar[tuple[str, ...]] = ("pandas",)

    def analyze(self, context: AnalysisContext, run_id: int) -> pd.DataFrame:
        """Analyze run ``run_id``; returns one row per layer (columns ``COLUMNS``).

        ``context.options``: see ``SpectralOptions``. ``frame.attrs`` holds run, kind,
        model-wide ``lipschitz_bound`` and ``baseline`` (whether the shuffled baseline was
        computed, or why not), and the CLI's title, table columns and notes. With
        ``store_results`` the rows are written to the ``analyses`` table (replacing an
        earlier analysis of the same kind).
        """
        import pandas as pd

        store = context.store
        opts = SpectralOptions.from_dict(context.options)
        kind = choose_kind(store, run_id, opts.kind)
        pairs = store.spectra_for_run(run_id, backend=opts.backend, kind=kind)
        if not pairs:
            raise SpecprofError(f"run {run_id} has no {kind} spectra from backend {opts.backend}",
                                "drop --backend, or see 'specprof query --run ID'")
        pairs = _pick_spectra(pairs)
        baseline = _Baseline.create(opts, pairs)
        by_layer = {row["id"]: (row, spectrum) for row, spectrum in pairs}
        # Every layer of the model, so that one without a spectrum shows (and voids the bound).
        layer_rows = store.layers(store.run_info(run_id)["model_id"]).to_dict("records")
        records, stored_rows = [], []
        product: float | None = 1.0
        with context.track(len(layer_rows), f"analyzing run {run_id}") as tick:
            for layer_row in layer_rows:
                record, ids = self._layer(layer_row, by_layer, kind, run_id, baseline)
                if record.get("layer_bound") is None:
                    product = None
                elif product is not None:
                    product *= record["layer_bound"]
                record["lipschitz_bound"] = product
                records.append(record)
                stored_rows.append(ids)
                tick(record)
        frame = pd.DataFrame(records, columns=COLUMNS)
        for column in INT_COLUMNS:  # counts stay integers (or None), not floats with NaN
            frame[column] = pd.Series([r.get(column) for r in records], dtype=object)
        bound = "n/a" if product is None else f"{product:.6g}"
        frame.attrs.update({
            "run": run_id, "kind": kind, "lipschitz_bound": product, "baseline": baseline.status,
            "title": f"run {run_id}: {kind} spectra, {len(frame)} layers; Lipschitz upper "
                     f"bound (product of layer norms) {bound}",
            "table_columns": TABLE_COLUMNS, "notes": [f"baseline: {baseline.status}"]})
        if opts.store_results:
            params = {"kind": kind, "backend": opts.backend or "auto"}
            store.add_analysis(run_id, ANALYZER, params, [
                {**ids, "metrics": {k: v for k, v in record.items()
                                    if k not in ("layer", "layer_index")}}
                for ids, record in zip(stored_rows, records, strict=True)])
        return frame

    @staticmethod
    def _layer(layer_row: dict[str, Any],
               by_layer: dict[int, tuple[dict[str, Any], Spectrum]], kind: str, run_id: int,
               baseline: _Baseline) -> tuple[dict[str, Any], dict[str, Any]]:
        """One layer's record and the ids its stored row refers to."""
        if layer_row["id"] not in by_layer:  # shown, and it voids the model's bound
            record = _missing_record(layer_row, kind, run_id)
            return record, {"layer_id": layer_row["id"], "spectrum_id": None}
        row, spectrum = by_layer[layer_row["id"]]
        record = _layer_record(row, spectrum)
        extra = baseline.metrics(row, spectrum)
        note = extra.pop("baseline_note", None)
        if note:
            record["notes"] = "; ".join(filter(None, [record["notes"], note]))
        record.update(extra)
        return record, {"layer_id": row["id"], "spectrum_id": row["spectrum_id"]}


def _missing_record(row: dict[str, Any], kind: str, run_id: int) -> dict[str, Any]:
    """A layer with no spectrum of ``kind`` in the run (skipped, failed or not computed)."""
    return {"layer": row["name"], "layer_index": int(row["index"]), "op_type": row["op_type"],
            "description": row.get("description"), "kind": kind,
            "notes": f"no {kind} spectrum of this layer in run {run_id} "
                     "(see specprof query --run ID): the model's Lipschitz bound is unknown"}


def _layer_record(row: dict[str, Any], spectrum: Spectrum) -> dict[str, Any]:
    shape = matrix_shape(row, spectrum)
    diagnostics = rmt.diagnose(spectrum.values, spectrum.multiplicities, shape)
    bound, how = layer_norm_bound(row, spectrum)
    notes = list(diagnostics.notes)
    if bound is None:
        notes.append(f"no norm bound ({how})")
    elif spectrum.kind == "filter" and row["op_type"] not in ("Gemm", "MatMul"):
        notes.append(f"layer bound: {how}")
    metrics = diagnostics.metrics()
    metrics["notes"] = "; ".join(notes) or None
    return {"layer": row["name"], "layer_index": int(row["index"]), "op_type": row["op_type"],
            "description": row.get("description"), "kind": spectrum.kind,
            "backend": spectrum.backend, "exact": bool(spectrum.exact),
            "spectrum_id": int(row["spectrum_id"]), **metrics, "layer_bound": bound,
            "rand_alpha": None, "rand_n_spikes": None, "rand_spectral_norm": None}


@dataclass
class _Baseline:
    """The shuffled-weights comparison: recompute each layer's spectrum, same kind and backend,
    from a seeded permutation of its weights."""

    layers: dict[str, Layer]
    registry: Registry | None
    seed: int
    status: str

    @classmethod
    def create(cls, opts: SpectralOptions, pairs: list[tuple[dict[str, Any], Spectrum]]) -> _Baseline:
        if opts.model is None:
            return cls({}, None, opts.seed, NO_BASELINE)
        layers = {layer.content_hash: layer for layer in opts.model.layers}
        if not any(row["layer_hash"] in layers for row, _ in pairs):
            return cls({}, None, opts.seed,
                       f"model {opts.model.name} is not the run's model: no shuffled baseline")
        from specprof.engine.plugins import get_registry

        return cls(layers, get_registry(), opts.seed, f"shuffled weights, seed {opts.seed}")

    def metrics(self, row: dict[str, Any], spectrum: Spectrum) -> dict[str, Any]:
        layer = self.layers.get(row["layer_hash"])
        if layer is None or self.registry is None:
            return {}
        backend = self.registry.backend(spectrum.backend)
        params = spectrum.params
        request = Request(boundary=params.get("boundary", spectrum.boundary or "zeros"),
                          top_k=params.get("top_k"), precision=params.get("precision", "float64"),
                          keep_vectors=False)
        # Distinct seeds per layer, so two layers of equal shape get different permutations.
        shuffled = replace(layer, weight=rmt.shuffled(layer.weight, self.seed + int(row["index"])))
        support = backend.supports(shuffled, request)
        if not support:
            return {"baseline_note": f"no shuffled baseline: {support.reason}"}
        random_spectrum = backend.compute(shuffled, request)
        diagnostics = rmt.diagnose(random_spectrum.values, random_spectrum.multiplicities,
                                   matrix_shape(row, random_spectrum))
        return {"rand_alpha": diagnostics.power_law.alpha, "rand_n_spikes": diagnostics.mp.n_spikes,
                "rand_spectral_norm": diagnostics.spectral_norm}


# --- commands ------------------------------------------------------------------------------------


@click.command()
@DB_OPTION
@click.option("--run", type=click.IntRange(min=1), help="Run to report (default: the latest complete run).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="report.html",
              show_default=True, help="HTML file to write.")
@click.option("--spectrum", "kind", type=click.Choice(list(KINDS)),
              help="Spectrum kind, if the run has no stored spectral analysis yet.")
@click.option("-q", "--quiet", is_flag=True)
def report(db: str | None, run: int | None, output: str, kind: str | None, quiet: bool) -> None:
    """Write a self-contained HTML report of one run: table, plots, parameters."""
    from specprof.engine.store import Store
    from specprof.plugins.analyzers.report import write_report

    with Store.open(db) as store:
        if run is None:
            run = store.latest_run() or store.latest_run(status=None)
            if run is None:
                raise StoreError(f"no runs in {store.display_url}", "run: specprof profile MODEL")
        path = write_report(store, run, output, kind=kind)
    console(quiet).print(f"report of run {run} written to {path}", markup=False, highlight=False)


@hookimpl
def specprof_register_analyzers() -> list[type]:
    return [SpectralAnalyzer]


@hookimpl
def specprof_register_commands(cli: Any) -> None:
    cli.add_command(report)
