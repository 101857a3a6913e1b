"""The ``spectral`` analyzer: random-matrix diagnostics of every layer of a stored run.

It reads one kind of spectrum (operator or filter, chosen and labelled) from the store, fits
each layer's ESD (``specprof.plugins.analyzers.rmt``), bounds the network's Lipschitz constant
by the product of the layers' norms, optionally compares each layer with its weights shuffled,
and writes the metrics back (``analyses`` table). It also adds the ``specprof analyze`` and
``specprof report`` commands.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import click
import numpy as np

from specprof.engine import hookimpl
from specprof.engine.base import Analyzer
from specprof.engine.cli import DB_OPTION, OUTPUT_FORMATS, emit
from specprof.engine.errors import SpecprofError, StoreError
from specprof.engine.types import Layer, LoadedModel, Request, Spectrum
from specprof.plugins.analyzers import rmt

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


def _prod(values: Any) -> int:
    return int(math.prod(int(v) for v in values))


def layer_from_row(row: dict[str, Any]) -> Layer:
    """A weightless ``Layer`` (zeros of the stored shape) rebuilt from a stored layer row, so
    the engine's own shape logic (``operator_shape``) answers for it."""
    return Layer(name=row["name"], op_type=row["op_type"],
                 weight=np.zeros(row["weight_shape"], dtype=np.float32),
                 strides=tuple(row.get("strides") or ()), pads=tuple(row.get("pads") or ()),
                 dilations=tuple(row.get("dilations") or ()), groups=int(row.get("groups") or 1),
                 output_padding=tuple(row.get("output_padding") or ()),
                 input_shape=None if row.get("input_shape") is None else tuple(row["input_shape"]),
                 output_shape=None if row.get("output_shape") is None else tuple(row["output_shape"]),
                 index=int(row.get("index") or 0))


def matrix_shape(row: dict[str, Any], spectrum: Spectrum) -> tuple[int, int] | None:
    """(rows, cols) of the matrix whose singular values ``spectrum`` holds; None if unknown.

    filter: the unfolded weight ``reshape(W, W.shape[0], -1)`` (DeepDataProfiler); operator:
    the layer's map on one sample (output size x input size, for the spectrum's boundary).
    """
    weight_shape = list(row["weight_shape"])
    if spectrum.kind == "filter" or row["op_type"] in ("Gemm", "MatMul"):
        return int(weight_shape[0]), _prod(weight_shape[1:])
    if row.get("input_shape") is None:
        return None
    from specprof.engine.operator import operator_shape

    try:
        rows, cols = operator_shape(layer_from_row(row), spectrum.boundary or "zeros")
    except SpecprofError:
        return None
    return (rows, cols) if rows > 0 and cols > 0 else None


def layer_norm_bound(row: dict[str, Any], spectrum: Spectrum) -> tuple[float | None, str]:
    """A certified upper bound of the layer's operator norm from this spectrum, and how.

    - operator, exact: its sigma_max; operator, approximate: the stored certified
      ``upper_bound`` (toeplitz), never the approximate sigma_max, which may be below the norm.
    - filter of a matrix layer: the filter SVD is the matrix's SVD, so sigma_max (if exact).
    - filter of a convolution: sqrt(prod(kernel)) x sigma_max of the unfolded weight R. The
      operator is A = (R (x) I) S with S the stacked tap shifts (zero or circular padding,
      stride, dilation, groups all only drop or zero rows of S), and ||S||^2 <= number of taps.
    """
    if spectrum.values.size == 0:
        return None, "no values"
    if spectrum.kind == "operator":
        if spectrum.exact:
            return spectrum.sigma_max, "exact sigma_max"
        if spectrum.upper_bound is not None and math.isfinite(spectrum.upper_bound):
            return float(spectrum.upper_bound), "certified upper bound"
        return None, "approximate spectrum without a certified upper bound"
    if not spectrum.exact:
        return None, "approximate filter spectrum"
    if row["op_type"] in ("Gemm", "MatMul"):
        return spectrum.sigma_max, "exact sigma_max"
    taps = _prod(list(row["weight_shape"])[2:])
    return math.sqrt(taps) * spectrum.sigma_max, f"sqrt({taps}) x filter sigma_max"


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
    registry: Any = None
    seed: int = DEFAULT_SEED
    store_results: bool = True
    on_layer: Callable[[Any], None] | None = None

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

    def analyze(self, store: Any, run_id: int, options: dict[str, Any]) -> pd.DataFrame:
        """Analyze run ``run_id``; returns one row per layer (columns ``COLUMNS``).

        ``frame.attrs`` holds run, kind, model-wide ``lipschitz_bound`` and ``baseline`` (whether
        the shuffled baseline was computed, or why not). With ``store_results`` the rows are
        written to the ``analyses`` table (replacing an earlier analysis of the same kind).
        """
        import pandas as pd

        opts = SpectralOptions.from_dict(options)
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
        for layer_row in layer_rows:
            if layer_row["id"] not in by_layer:
                record = _missing_record(layer_row, kind, run_id)
                product = None
                record["lipschitz_bound"] = None
                records.append(record)
                stored_rows.append({"layer_id": layer_row["id"], "spectrum_id": None})
                continue
            row, spectrum = by_layer[layer_row["id"]]
            record = _layer_record(row, spectrum)
            product = None if product is None or record["layer_bound"] is None \
                else product * record["layer_bound"]
            record["lipschitz_bound"] = product
            extra = baseline.metrics(row, spectrum)
            note = extra.pop("baseline_note", None)
            if note:
                record["notes"] = "; ".join(filter(None, [record["notes"], note]))
            record.update(extra)
            records.append(record)
            stored_rows.append({"layer_id": row["id"], "spectrum_id": row["spectrum_id"]})
            if opts.on_layer is not None:
                opts.on_layer(record)
        frame = pd.DataFrame(records, columns=COLUMNS)
        for column in INT_COLUMNS:  # counts stay integers (or None), not floats with NaN
            frame[column] = pd.Series([r.get(column) for r in records], dtype=object)
        frame.attrs.update({"run": run_id, "kind": kind, "lipschitz_bound": product,
                            "baseline": baseline.status})
        if opts.store_results:
            params = {"kind": kind, "backend": opts.backend or "auto"}
            store.add_analysis(run_id, ANALYZER, params, [
                {**ids, "metrics": {k: v for k, v in record.items()
                                    if k not in ("layer", "layer_index")}}
                for ids, record in zip(stored_rows, records, strict=True)])
        return frame


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
        from specprof.engine.plugins import Registry

        registry = opts.registry or Registry.from_manager()
        return cls(layers, registry, opts.seed, f"shuffled weights, seed {opts.seed}")

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


def _latest_run_of_model(store: Store, model: LoadedModel, kind: str | None) -> int | None:
    """The newest complete run of this model's content that has spectra of ``kind``."""
    model_id, _ = store.add_model(model)
    runs = store.runs()
    for run_id in runs.loc[runs["status"] == "complete", "id"]:
        if store.run_info(int(run_id))["model_id"] != model_id:
            continue
        if kind is None or kind in run_kinds(store, int(run_id)):
            return int(run_id)
    return None


def resolve_run(store: Store, model: str | None, run: int | None, kind: str | None,
                db: str | None, input_shape: str | None, quiet: bool,
                say: Callable[[str], None]) -> tuple[int, LoadedModel | None]:
    """The run to analyze (and the loaded model, when MODEL is a file).

    A file is matched to stored runs by content; when none has the requested kind, the model
    is profiled first (filter backend for filter spectra, ``auto`` otherwise).
    """
    if (model is None) == (run is None):
        raise SpecprofError("give either MODEL or --run ID", "e.g. specprof analyze model.onnx")
    if run is not None:
        store.run_info(run)  # a clear error if there is no such run
        return run, None
    assert model is not None
    if not os.path.exists(model):
        found = store.latest_run(model=model)
        if found is None:
            raise StoreError(f"no complete run of a model named '{model}' and no such file",
                             "profile it first: specprof profile MODEL_FILE, or see specprof runs")
        return found, None
    from specprof.engine import api
    from specprof.engine.progress import layer_progress

    loaded = api.load_model(model, input_shape=input_shape)
    found = _latest_run_of_model(store, loaded, kind)
    if found is not None:
        return found, loaded
    backend = "filter" if kind == "filter" else "auto"
    say(f"no stored run of {loaded.name} has {kind or 'any'} spectra: profiling it now "
        f"with backend {backend}")
    with layer_progress(len(loaded.layers), f"profiling {loaded.name}", quiet) as tick:
        frame = api.profile(loaded, backend=backend, db=db, on_layer=tick)
    return int(frame.attrs["run_id"]), loaded


@click.command()
@click.argument("model", required=False)
@click.option("--run", type=int, help="Analyze this stored run instead of MODEL's latest.")
@DB_OPTION
@click.option("--spectrum", "kind", type=click.Choice(list(KINDS)),
              help="Spectrum kind to analyze (default: operator if stored, else filter).")
@click.option("--backend", help="Only spectra from this backend (default: exact if stored).")
@click.option("--input-shape", metavar="C,H,W", help="Input size, if MODEL needs profiling.")
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True,
              help="Seed of the weight shuffling for the randomized baseline.")
@click.option("--format", "fmt", type=OUTPUT_FORMATS, default="table", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or notes.")
def analyze(model: str | None, run: int | None, db: str | None, kind: str | None,
            backend: str | None, input_shape: str | None, seed: int, fmt: str,
            quiet: bool) -> None:
    """RMT diagnostics per layer of MODEL (a file or stored model name) or of --run ID.

    With a MODEL file the layers are also compared with their weights shuffled (columns
    rand_*); with --run or a model name those stay empty, as the store has no weights.
    """
    from specprof.engine.cli import _console
    from specprof.engine.progress import layer_progress
    from specprof.engine.store import Store

    notes = _console(quiet)  # notes go to stderr, so JSON/CSV on stdout stay clean
    with Store.open(db) as store:
        run_id, loaded = resolve_run(store, model, run, kind, db, input_shape,
                                     quiet or fmt != "table",
                                     lambda text: notes.print(text, highlight=False))
        chosen = choose_kind(store, run_id, kind)
        n_layers = len({row["id"] for row, _ in store.spectra_for_run(run_id, kind=chosen)})
        with layer_progress(n_layers, f"analyzing run {run_id}", quiet or fmt != "table") as tick:
            frame = SpectralAnalyzer().analyze(store, run_id, {
                "kind": chosen, "backend": backend, "model": loaded, "seed": seed,
                "on_layer": tick})
    bound = frame.attrs["lipschitz_bound"]
    title = (f"run {run_id}: {chosen} spectra, {len(frame)} layers; Lipschitz upper bound "
             f"(product of layer norms) {'n/a' if bound is None else f'{bound:.6g}'}")
    emit(frame, fmt, title, columns=TABLE_COLUMNS if fmt == "table" else None)
    notes.print(f"baseline: {frame.attrs['baseline']}", highlight=False)


@click.command()
@DB_OPTION
@click.option("--run", type=int, help="Run to report (default: the latest complete run).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="report.html",
              show_default=True, help="HTML file to write.")
@click.option("--spectrum", "kind", type=click.Choice(list(KINDS)),
              help="Spectrum kind, if the run has no stored spectral analysis yet.")
@click.option("-q", "--quiet", is_flag=True)
def report(db: str | None, run: int | None, output: str, kind: str | None, quiet: bool) -> None:
    """Write a self-contained HTML report of one run: table, plots, parameters."""
    from specprof.engine.cli import _console
    from specprof.engine.store import Store
    from specprof.plugins.analyzers.report import write_report

    with Store.open(db) as store:
        if run is None:
            run = store.latest_run() or store.latest_run(status=None)
            if run is None:
                raise StoreError(f"no runs in {store.display_url}", "run: specprof profile MODEL")
        path = write_report(store, run, output, kind=kind)
    _console(quiet).print(f"report of run {run} written to {path}", highlight=False)


@hookimpl
def specprof_register_analyzers() -> list[type]:
    return [SpectralAnalyzer]


@hookimpl
def specprof_register_commands(cli: Any) -> None:
    cli.add_command(analyze)
    cli.add_command(report)
