"""The ``specprof`` command line. Every command is a thin layer over ``specprof.engine.api``."""

from __future__ import annotations

import sys
from functools import partial
from typing import Any

import click

from specprof.engine.cli_common import (
    DB_OPTION,
    OUTPUT_FORMATS,
    SpecprofGroup,
    bounds_text,
    console,
    emit,
    is_missing,
    number,
    print_wide,
    short_name,
    warn,
)
from specprof.engine.errors import SpecprofError, printable


def _model_options(func: Any) -> Any:
    func = click.option("--skip-unsupported", is_flag=True,
                        help="Go on with the layers that can be extracted where a node or "
                             "a normalization step fails.")(func)
    func = click.option("--fold-batchnorm", is_flag=True,
                        help="Fold a BatchNormalization after a Conv/ConvTranspose/Gemm into "
                             "its weight (default: the layer as the model computes it).")(func)
    func = click.option("--model-class", metavar="MODULE:CLASS",
                        help="Class to rebuild a PyTorch state_dict file, e.g. mypkg.nets:ResNet.")(func)
    func = click.option("--format", "model_format", metavar="NAME",
                        help="Model format (importer name); default: from content and suffix.")(func)
    func = click.option("--input-shape", metavar="C,H,W",
                        help="Input size of one sample, for models whose input is dynamic.")(func)
    return func


@click.command()
@click.argument("models", metavar="MODEL [MODEL ...]", nargs=-1, required=True,
                type=click.Path(dir_okay=True))
@DB_OPTION
@click.option("--backend", default="auto", show_default=True,
              help="Backend name, or several separated by commas; 'auto' picks per layer.")
@click.option("--boundary", type=click.Choice(["model", "zeros", "circular"]), default="model",
              show_default=True,
              help="model: each layer's own padding (zeros, or circular where the model wraps "
                   "the input); zeros/circular: that boundary for every layer.")
@click.option("--top-k", type=click.IntRange(min=1), help="Only the K largest singular values.")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda, cuda:N, or auto (cuda when torch sees a GPU, else cpu).")
@click.option("--prefer", metavar="NAME,...",
              help="Backends auto tries first, in this order, where they support the layer "
                   "(e.g. a plugin's backend); otherwise auto picks by cost.")
@click.option("--precision", type=click.Choice(["float64", "float32"]),
              help="Arithmetic of the SVDs [default: float32 for weights-only checkpoints "
                   "(safetensors, GGUF, state dicts, LoRA), float64 otherwise].")
@click.option("--max-dense", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Largest matrix side the dense exact SVD accepts.")
@click.option("--max-memory", metavar="SIZE",
              help="Memory one layer may take, e.g. 8G or 512M; a backend estimated above it "
                   "is not run on the layer [default: half the memory available].")
@click.option("--max-seconds", type=click.FloatRange(min=0, min_open=True), default=300.0,
              show_default=True,
              help="Estimated seconds an approximate backend (toeplitz) may take on one layer.")
@click.option("--force", is_flag=True, help="Recompute spectra already in the database.")
@click.option("--resume", is_flag=True,
              help="Continue the last interrupted run of this model and configuration.")
@click.option("--name", help="Name to store the model under (default: the file name).")
@click.option("--workers", type=click.IntRange(min=1), metavar="N",
              help="Compute on a local Dask cluster of N worker processes (needs the 'dask' "
                   "extra); this process still plans and writes.")
@click.option("--scheduler", metavar="tcp://HOST:PORT", envvar="SPECPROF_SCHEDULER",
              help="Compute on the Dask cluster of this scheduler [default: "
                   "$SPECPROF_SCHEDULER]; see docs/distributed.md.")
@_model_options
@click.option("--output-format", type=OUTPUT_FORMATS, default="table", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def profile(models: tuple[str, ...], db: str | None, backend: str, boundary: str, top_k: int | None,
            device: str, prefer: str | None, precision: str | None, max_dense: int, force: bool,
            resume: bool,
            name: str | None, workers: int | None, scheduler: str | None,
            max_memory: str | None, max_seconds: float,
            input_shape: str | None, model_format: str | None, model_class: str | None,
            output_format: str, quiet: bool, fold_batchnorm: bool = False,
            skip_unsupported: bool = False) -> None:
    """Compute the spectra of every linear layer of each MODEL and store one run per model.

    MODEL is a model file, a folder (of model files, or one sharded checkpoint) or a glob. A
    model that fails is reported and the others go on; the exit status is 1 if any failed.
    """
    from rich.markup import escape

    from specprof.engine import api
    from specprof.engine.distributed import DaskExecutor, open_executor
    from specprof.engine.limits import parse_memory
    from specprof.engine.plugins import get_registry
    from specprof.engine.profile import ExecutorLost, ProfileConfig, split_names, validate_backends
    from specprof.engine.progress import run_progress

    preferred = split_names(prefer)
    resolved = ProfileConfig(device=device).device  # a bad --device fails before any loading
    registry = get_registry()
    validate_backends(split_names(backend), registry, preferred)
    if name is not None and len(models) > 1:
        raise SpecprofError("--name names one model, and several were given",
                            "leave --name out: each model is stored under its file name")
    sources = api.model_sources(models, registry, model_format)
    load = partial(api.load_model, format=model_format, input_shape=input_shape,
                   model_class=model_class, name=name, registry=registry,
                   fold_batchnorm=fold_batchnorm, skip_unsupported=skip_unsupported)
    options = {"backend": backend, "db": db, "boundary": boundary, "device": resolved,
               "top_k": top_k, "precision": precision, "prefer": preferred,
               "max_dense": max_dense, "force": force, "resume": resume,
               "max_memory": None if max_memory is None else parse_memory(max_memory),
               "max_seconds": max_seconds}
    show = output_format == "table"
    frames, failed = [], []
    with open_executor(workers, scheduler, resolved) as executor, \
            run_progress(quiet, bar=show) as tracker:
        if isinstance(executor, DaskExecutor):
            tracker.say(executor.describe())
        ahead = isinstance(executor, DaskExecutor)  # computed elsewhere: read the next model meanwhile
        for position, (source, loaded) in enumerate(api.loaded_models(sources, load, ahead), 1):
            where = f" ({position}/{len(sources)})" if len(sources) > 1 else ""
            try:
                if isinstance(loaded, SpecprofError):
                    raise loaded
                frame = _profile_one(loaded, options, executor, tracker, where, quiet, show)
            except ExecutorLost:
                raise
            except SpecprofError as error:
                if len(sources) == 1:
                    raise
                failed.append(str(source))
                console().print(f"[red]error:[/] {escape(printable(str(source)))}: "
                                f"{escape(error.one_line())}", highlight=False)
                continue
            frames.append((str(source), frame))
    if not show:
        _emit_profiles(frames, output_format)
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(sources)} models failed: "
                                   f"{printable(', '.join(failed))}")


def _profile_one(loaded: Any, options: dict[str, Any], executor: Any, tracker: Any, where: str,
                 quiet: bool, show: bool) -> Any:
    """Profile one loaded model for ``profile``; prints its table (table format)."""
    from specprof.engine import api

    tracker.grow(len(loaded.layers) * len(options["backend"].split(",")),
                 f"profiling {loaded.name}{where}")
    frame = api.profile(loaded, **options, on_layer=tracker, executor=executor)
    warn(loaded.warnings, quiet)
    title = f"run {frame.attrs['run_id']}: {loaded.name} ({loaded.format}, {len(loaded.layers)} layers)"
    if show:
        _print_profile_table(frame, title)
    if loaded.skipped and show and not quiet:
        console().print(f"{len(loaded.skipped)} node(s) not profiled: see 'specprof layers'")
    return frame


def _emit_profiles(frames: list[tuple[str, Any]], output_format: str) -> None:
    """JSON or CSV of the runs: one model's table as it is, several behind a ``model`` column."""
    import pandas as pd

    if len(frames) == 1:
        emit(frames[0][1], output_format)
        return
    tables = [frame.assign(model=source)[["model", *frame.columns]] for source, frame in frames]
    emit(pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(), output_format)


def _print_profile_table(frame: Any, title: str) -> None:
    """The per-layer table of a run, compact enough for a 120-column terminal."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(printable(title)), title_justify="left", header_style="bold")
    for name, justify in (("#", "right"), ("layer", "left"), ("op", "left"),
                          ("backend", "left"), ("σ_max", "right"), ("±", "right"),
                          ("σ_min", "right"), ("n", "right"), ("bounds on σ_max", "right"),
                          ("time", "right"),
                          ("why", "left")):
        table.add_column(name, justify=justify,  # type: ignore[arg-type]
                         no_wrap=name not in ("layer", "op", "why"), overflow="fold")
    for row in frame.itertuples(index=False):
        ok = row.status in ("ok", "reused")
        backend = row.backend if row.status == "ok" else f"{row.backend} ({row.status})"
        table.add_row(
            str(row.index), Text(printable(short_name(row.layer))), Text(printable(row.shape)),
            Text(printable(backend), style="" if ok else "red"),
            number(row.sigma_max, ".4g") if ok else "",
            _error_text(row.sigma_max_error) if ok else "",
            number(row.sigma_min, ".4g") if ok else "",
            str(row.n_values) if ok else "", Text(bounds_text(row.lower_bound, row.upper_bound)),
            f"{row.seconds:.2f} s" if row.status == "ok" else "", Text(printable(row.reason or "")))
    print_wide(table)
    if frame["sigma_max_error"].notna().any():
        console().print("±: how far σ_max can be from the true one, from its certified bounds; "
                        "where it is too wide for you, ask for --backend exact", highlight=False)


def _error_text(error: float) -> str:
    """A relative error as a short percentage ('' when unknown)."""
    if is_missing(error):
        return ""
    return "<0.01%" if error < 1e-4 else f"{100 * error:.2g}%"


@click.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--backends", default="exact,fft-circulant,toeplitz", show_default=True,
              help="Backends to compare, separated by commas; 'exact' is the reference.")
@DB_OPTION
@click.option("--boundary", type=click.Choice(["model", "zeros", "circular"]), default="model",
              show_default=True, help="As for profile.")
@click.option("--top-k", type=click.IntRange(min=1), help="Compare only the K largest values.")
@click.option("--max-dense", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option("--force", is_flag=True, help="Recompute spectra already in the database.")
@_model_options
@click.option("--output-format", type=OUTPUT_FORMATS, default="table", show_default=True)
def compare(model: str, backends: str, db: str | None, boundary: str, top_k: int | None,
            max_dense: int, force: bool, input_shape: str | None, model_format: str | None,
            model_class: str | None, output_format: str, fold_batchnorm: bool = False,
            skip_unsupported: bool = False) -> None:
    """Run several backends on the layers of MODEL; errors are against the exact backend."""
    from specprof.engine import api
    from specprof.engine.compare import compare_backends
    from specprof.engine.plugins import get_registry
    from specprof.engine.profile import ProfileConfig, split_names, validate_backends
    from specprof.engine.store import Store

    registry = get_registry()
    config = ProfileConfig(backends=split_names(backends),
                           boundary=boundary, top_k=top_k,  # type: ignore[arg-type]
                           max_dense=max_dense, force=force)
    validate_backends(config.backends, registry)
    loaded = api.load_model(model, format=model_format, input_shape=input_shape,
                            model_class=model_class, registry=registry,
                            fold_batchnorm=fold_batchnorm, skip_unsupported=skip_unsupported)
    from specprof.engine.progress import layer_progress

    n_tasks = len(loaded.layers) * len(config.backends)
    with Store.open(db) as store, layer_progress(n_tasks, f"comparing on {loaded.name}",
                                                 output_format != "table") as tick:
        frame = compare_backends(loaded, config, store, registry, on_layer=tick)
    if output_format != "table":
        emit(frame, output_format)
        return
    _print_compare_table(frame, f"{loaded.name}: backends against exact (boundary: {boundary})")


def _print_compare_table(frame: Any, title: str) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(printable(title)), title_justify="left", header_style="bold")
    for name in ("#", "layer", "backend", "σ_max", "rel. error", "all values", "bounds",
                 "brackets", "time"):
        table.add_column(name, justify="left" if name in ("layer", "backend") else "right",
                         overflow="fold")
    previous = None
    for row in frame.itertuples(index=False):
        backend = row.backend + (f" ({row.boundary})" if row.fallback else "")
        if row.status not in ("ok", "reused"):
            backend += f" ({row.status})"
        bounds = Text(bounds_text(row.lower_bound, row.upper_bound))
        brackets = "" if is_missing(row.brackets) else ("yes" if row.brackets else "[red]NO[/]")
        first = row.index != previous
        seconds = "" if is_missing(row.seconds) else f"{row.seconds:.3f} s"
        table.add_row(str(row.index) if first else "",
                      Text(printable(short_name(row.layer))) if first else "",
                      Text(printable(backend)), number(row.sigma_max, ".6g"), number(row.rel_error, ".2%"),
                      number(row.spectrum_error, ".2%"), bounds, brackets, seconds)
        previous = row.index
    print_wide(table)
    console().print("rel. error: |σ_max - exact| / exact;  all values: mean |σ_i - exact_i| / "
                     "exact σ_max;  (circular): the backend answers the periodic operator only",
                     highlight=False)


@click.command()
@click.argument("model", type=click.Path(dir_okay=True))
@_model_options
@click.option("--output-format", type=OUTPUT_FORMATS, default="table", show_default=True)
def layers(model: str, input_shape: str | None, model_format: str | None,
           model_class: str | None, output_format: str, fold_batchnorm: bool = False,
           skip_unsupported: bool = False) -> None:
    """List the linear layers of MODEL, and the nodes skipped with the reason."""
    import pandas as pd

    from specprof.engine import api

    loaded = api.load_model(model, format=model_format, input_shape=input_shape,
                            model_class=model_class, fold_batchnorm=fold_batchnorm,
                            skip_unsupported=skip_unsupported)
    rows = [{"index": layer.index, "layer": layer.name, "block": layer.block,
             "role": layer.role, "op_type": layer.op_type,
             "shape": layer.describe(), "weight": "x".join(map(str, layer.weight.shape)),
             "input": "x".join(map(str, layer.input_shape or ())) or "unknown",
             "status": "profiled", "reason": layer.note} for layer in loaded.layers]
    rows += [{"index": None, "layer": node.name, "block": None, "role": "",
              "op_type": node.op_type, "shape": "", "weight": "", "input": "",
              "status": "skipped", "reason": node.reason}
             for node in loaded.skipped]
    graph = f"opset {loaded.opset}" if loaded.proto is not None else "weights only"
    title = (f"{loaded.name}: imported by '{loaded.format}' ({loaded.framework}), {graph}, "
             f"{len(loaded.layers)} layers, {loaded.n_params:,} parameters")
    warn(loaded.warnings, output_format != "table")
    frame = pd.DataFrame(rows)
    frame["block"] = frame["block"].astype("Int64")
    if output_format == "table":  # a blank cell, not <NA>, where a name has no block
        frame["block"] = [str(block) if block is not pd.NA else "" for block in frame["block"]]
    emit(frame, output_format, title)


def _plugin_rows(kind: str | None = None) -> list[dict[str, Any]]:
    from specprof.engine.plugins import get_registry

    registry = get_registry()
    rows = []
    for plugin_kind, name, support, origin in registry.availability():
        if kind and plugin_kind != kind:
            continue
        cls = registry.table(plugin_kind)[name]
        rows.append({"kind": plugin_kind, "name": name,
                     "spectrum": getattr(cls, "kind", ""),
                     "exact": getattr(cls, "exact", ""),
                     "available": "yes" if support else f"no: {support.reason}",
                     "from": origin, "description": cls.description})
    if kind is None:
        rows += [{"kind": "plugin", "name": broken.name, "spectrum": "", "exact": "",
                  "available": f"broken: {broken.error}", "from": broken.origin,
                  "description": broken.hint} for broken in registry.broken]
    return rows


@click.command()
@click.option("--output-format", type=OUTPUT_FORMATS, default="table", show_default=True)
def backends(output_format: str) -> None:
    """List the backends, what they compute, and whether they can run here."""
    import pandas as pd

    frame = pd.DataFrame(_plugin_rows("backend")).drop(columns=["kind"])
    emit(frame, output_format, "backends")


@click.command()
@click.option("--output-format", type=OUTPUT_FORMATS, default="table", show_default=True)
def plugins(output_format: str) -> None:
    """List every plugin object (importers, backends, analyzers), where it comes from (its
    distribution and version), and third-party plugins that failed to load."""
    import pandas as pd

    frame = pd.DataFrame(_plugin_rows()).drop(columns=["spectrum", "exact"])
    emit(frame, output_format, "plugins")


class SpecprofCLI(SpecprofGroup):
    """The ``specprof`` group: built-in commands, and plugin commands added on first lookup.

    Plugins are loaded only when a command is looked up or listed, so ``--version`` loads
    none; the registry's warnings (name clashes, broken third-party plugins) are printed once,
    on stderr, when they are.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plugins_loaded = False

    def _load_plugin_commands(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from specprof.engine.plugins import get_registry

        registry = get_registry()
        registry.pm.hook.specprof_register_commands(cli=self)
        notes = [*registry.warnings,
                 *(f"plugin {b.name} ({b.origin}) failed to load: {b.error}; {b.hint}"
                   for b in registry.broken)]
        warn(notes)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load_plugin_commands()
        return super().get_command(ctx, cmd_name)


def build_cli() -> click.Group:
    """A fresh ``specprof`` group with every built-in command; plugins add theirs on first use."""
    from specprof.engine import cli_analyze, cli_store

    @click.group(cls=SpecprofCLI, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(package_name="specprof")
    @click.option("-v", "--verbose", is_flag=True,
                  help="Show the log lines and warnings of TensorFlow, onnxruntime, JAX, torch "
                       "and the converters (hidden by default).")
    def cli(verbose: bool) -> None:
        """Profile the singular values of a model's linear layers and query the stored results."""
        from specprof.engine.logs import route_third_party_logs

        route_third_party_logs(verbose)

    for command in (profile, compare, layers, backends, plugins, cli_analyze.analyze,
                    *cli_store.COMMANDS):
        cli.add_command(command)
    return cli


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``specprof`` script."""
    try:
        command = build_cli()
    except SpecprofError as error:
        click.echo(f"Error: {error.one_line()}", err=True)
        sys.exit(1)
    command.main(args=argv, prog_name="specprof")
