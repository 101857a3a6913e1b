"""``specprof analyze``: run any registered analyzer on a stored run.

The command finds the run (``--run``, a stored model name, or a model file matched to its
stored runs by content, profiled first when none has the spectra asked for), builds the
analyzer's ``AnalysisContext`` and prints the frame it returns. Analyzers steer the output
through ``frame.attrs``: ``title``, ``table_columns`` (the columns of the terminal table) and
``notes`` (lines printed on stderr after it).
"""

from __future__ import annotations

import os
from functools import partial
from typing import TYPE_CHECKING, Any

import click

from specprof.engine.cli_common import DB_OPTION, OUTPUT_FORMATS, console, emit
from specprof.engine.errors import SpecprofError, StoreError

if TYPE_CHECKING:
    from specprof.engine.plugins import Registry
    from specprof.engine.store import Store
    from specprof.engine.types import LoadedModel

DEFAULT_ANALYZER = "spectral"
SPECTRUM_KINDS = ("operator", "filter")


def parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``("threshold=0.2", "layers=conv*")`` -> ``{"threshold": 0.2, "layers": "conv*"}``.

    Values are read as JSON where they parse (numbers, true/false, null, lists), else kept
    as text.
    """
    import json

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SpecprofError(f"option '{pair}' is not KEY=VALUE", "e.g. --option threshold=0.2")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


def resolve_run(store: Store, registry: Registry, model: str | None, run: int | None,
                kind: str | None, input_shape: str | None,
                say: Any) -> tuple[int, LoadedModel | None]:
    """The run to analyze, and the loaded model when MODEL is a file.

    A file is matched to the stored runs of the same content; when none has spectra of
    ``kind``, the model is profiled now (the filter backend for filter spectra, else auto).
    """
    from specprof.engine.loading import load_model
    from specprof.engine.profile import ProfileConfig, profile_model

    if (model is None) == (run is None):
        raise SpecprofError("give either MODEL or --run ID", "e.g. specprof analyze model.onnx")
    if run is not None:
        return store.find_run(run=run, status=None), None
    assert model is not None
    if not os.path.exists(model):
        return store.find_run(model=model, kind=kind), None
    loaded = load_model(model, input_shape=input_shape, registry=registry)
    model_id, _ = store.add_model(loaded)
    found = _stored_run(store, model_id, kind)
    if found is not None:
        return found, loaded
    backend = "filter" if kind == "filter" else "auto"
    say(f"no stored run of {loaded.name} has {kind or 'any'} spectra: profiling it now "
        f"with backend {backend}")
    result = profile_model(loaded, ProfileConfig(backends=(backend,)), store, registry)
    return result.run_id, loaded


def _stored_run(store: Store, model_id: int, kind: str | None) -> int | None:
    """The newest complete run of this model content with ``kind`` spectra, if any."""
    try:
        return store.find_run(model_id=model_id, kind=kind)
    except StoreError:  # none stored: the caller profiles the model
        return None


def analysis_context(store: Store, registry: Registry, options: dict[str, Any],
                     quiet: bool, quiet_bar: bool) -> Any:
    """The ``AnalysisContext`` the CLI hands to an analyzer."""
    from specprof.engine.base import AnalysisContext
    from specprof.engine.loading import load_model
    from specprof.engine.profile import ProfileConfig, profile_model
    from specprof.engine.progress import layer_progress

    def profile(model: LoadedModel, backends: tuple[str, ...] = ("auto",)) -> int:
        return profile_model(model, ProfileConfig(backends=tuple(backends)), store,
                             registry).run_id

    return AnalysisContext(store=store, options=options, console=console(quiet), quiet=quiet,
                           load_model=partial(load_model, registry=registry), profile=profile,
                           progress=partial(layer_progress, quiet=quiet_bar))


@click.command()
@click.argument("model", required=False)
@click.option("--run", type=click.IntRange(min=1), help="Analyze this stored run instead of "
                                                        "MODEL's latest.")
@click.option("--analyzer", "analyzer_name", default=DEFAULT_ANALYZER, show_default=True,
              metavar="NAME", help="Any analyzer of 'specprof plugins'.")
@DB_OPTION
@click.option("--spectrum", "kind", type=click.Choice(list(SPECTRUM_KINDS)),
              help="Spectrum kind to analyze (default: operator if stored, else filter).")
@click.option("--backend", help="Only spectra from this backend (default: exact if stored).")
@click.option("--input-shape", metavar="C,H,W", help="Input size, if MODEL needs profiling.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of any randomized part (spectral: the shuffled-weights baseline).")
@click.option("-O", "--option", "pairs", multiple=True, metavar="KEY=VALUE",
              help="An option of the analyzer (repeatable), e.g. -O threshold=0.2.")
@click.option("--format", "fmt", type=OUTPUT_FORMATS, default="table", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or notes.")
def analyze(model: str | None, run: int | None, analyzer_name: str, db: str | None,
            kind: str | None, backend: str | None, input_shape: str | None, seed: int,
            pairs: tuple[str, ...], fmt: str, quiet: bool) -> None:
    """Run an analyzer on MODEL (a file or stored model name) or on --run ID.

    The default, spectral, gives RMT diagnostics per layer; with a MODEL file it also
    compares each layer with its weights shuffled (columns rand_*), which needs the weights.
    """
    from specprof.engine.plugins import get_registry
    from specprof.engine.store import Store

    registry = get_registry()
    analyzer = registry.analyzer(analyzer_name)
    options = {"kind": kind, "backend": backend, "seed": seed, **parse_options(pairs)}
    with Store.open(db) as store:  # notes go to stderr, so JSON/CSV on stdout stay clean
        context = analysis_context(store, registry, options, quiet, quiet or fmt != "table")
        run_id, loaded = resolve_run(store, registry, model, run, kind, input_shape,
                                     context.say)
        if loaded is not None:
            options.setdefault("model", loaded)
        frame = analyzer.analyze(context, run_id)
    title = frame.attrs.get("title") or f"run {run_id}: {analyzer_name} analysis"
    columns = frame.attrs.get("table_columns") if fmt == "table" else None
    emit(frame, fmt, title, columns=columns)
    for note in frame.attrs.get("notes", ()):
        context.say(note)
