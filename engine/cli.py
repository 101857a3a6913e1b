"""The ``specprof`` command line. Every command is a thin layer over ``specprof.engine.api``."""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

import click

from specprof.engine.errors import SpecprofError

OUTPUT_FORMATS = click.Choice(["table", "json", "csv"])
DB_OPTION = click.option(
    "--db", metavar="URL",
    help="Database: a SQLite file path or an SQLAlchemy URL (postgresql://...). "
         "Default: $SPECPROF_DB, else ~/.local/share/specprof/specprof.db.")


class SpecprofGroup(click.Group):
    """Turns a ``SpecprofError`` anywhere below into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SpecprofError as error:
            raise click.ClickException(error.one_line()) from None


def _console(quiet: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=True, quiet=quiet)


def _jsonable(value: Any) -> Any:
    """A JSON-ready copy of a table cell: NaN/NA -> null, numpy scalars -> Python, times -> ISO."""
    import pandas as pd  # already imported by whoever built the frame

    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return None
    if hasattr(value, "isoformat"):  # datetime, pandas Timestamp
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalar
        return value.item()
    return value


def emit(frame: Any, fmt: str, title: str = "", columns: list[str] | None = None) -> None:
    """Write a DataFrame to stdout as a rich table, JSON records (NaN -> null) or CSV."""
    if columns is not None:
        frame = frame[[c for c in columns if c in frame.columns]]
    if fmt == "json":
        records = [{k: _jsonable(v) for k, v in row.items()} for row in frame.to_dict("records")]
        click.echo(json.dumps(records, indent=2))
    elif fmt == "csv":
        click.echo(frame.to_csv(index=False), nl=False)
    else:
        _print_table(frame, title)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value: Any, fmt: str) -> str:
    return "" if _missing(value) else format(value, fmt)


def _bounds(lower: Any, upper: Any) -> str:
    """``[lower, upper]`` of a spectral norm, or '' when the backend gave no bounds."""
    if _missing(lower) and _missing(upper):
        return ""
    return f"[{_number(lower, '.4g')}, {_number(upper, '.4g')}]"


def _print_wide(table: Any) -> None:
    """Print a rich table at least 120 columns wide, also when stdout is not a terminal."""
    from rich.console import Console

    Console(width=max(120, Console().width)).print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return _number(value, ".4g")
    if isinstance(value, list):
        return f"[{len(value)} values]"
    return "" if value is None else str(value)


def _print_table(frame: Any, title: str) -> None:
    from rich.table import Table

    table = Table(title=title or None, title_justify="left")
    for column in frame.columns:
        numeric = frame[column].dtype.kind in "fiu"
        table.add_column(str(column), justify="right" if numeric else "left",
                         overflow="fold")
    layer_column = list(frame.columns).index("layer") if "layer" in frame.columns else -1
    for row in frame.itertuples(index=False):
        cells = [_cell(v) for v in row]
        if layer_column >= 0:
            cells[layer_column] = short_name(cells[layer_column])
        table.add_row(*cells)
    _print_wide(table)


@click.group(cls=SpecprofGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="specprof")
def cli() -> None:
    """Profile the singular values of a model's linear layers and query the stored results."""


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


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True))
@DB_OPTION
@click.option("--backend", default="auto", show_default=True,
              help="Backend name, or several separated by commas; 'auto' picks per layer.")
@click.option("--boundary", type=click.Choice(["model", "zeros", "circular"]), default="model",
              show_default=True,
              help="model: each layer's own padding (zeros, or circular where the model wraps "
                   "the input); zeros/circular: that boundary for every layer.")
@click.option("--top-k", type=click.IntRange(min=1), help="Only the K largest singular values.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--precision", type=click.Choice(["float64", "float32"]), default="float64",
              show_default=True)
@click.option("--max-dense", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Largest matrix side the dense exact SVD accepts.")
@click.option("--force", is_flag=True, help="Recompute spectra already in the database.")
@click.option("--resume", is_flag=True,
              help="Continue the last interrupted run of this model and configuration.")
@click.option("--name", help="Name to store the model under (default: the file name).")
@_model_options
@click.option("--output-format", type=OUTPUT_FORMATS, default="table", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def profile(model: str, db: str | None, backend: str, boundary: str, top_k: int | None,
            device: str, precision: str, max_dense: int, force: bool, resume: bool,
            name: str | None,
            input_shape: str | None, model_format: str | None, model_class: str | None,
            output_format: str, quiet: bool, fold_batchnorm: bool = False,
            skip_unsupported: bool = False) -> None:
    """Compute the spectra of every linear layer of MODEL and store the run."""
    from specprof.engine import api
    from specprof.engine.progress import layer_progress

    loaded = api.load_model(model, format=model_format, input_shape=input_shape,
                            model_class=model_class, name=name, fold_batchnorm=fold_batchnorm,
                            skip_unsupported=skip_unsupported)
    n_tasks = len(loaded.layers) * len(backend.split(","))
    with layer_progress(n_tasks, f"profiling {loaded.name}", quiet or output_format != "table") as tick:
        frame = api.profile(loaded, backend=backend, db=db, boundary=boundary,  # type: ignore[arg-type]
                            device=device, top_k=top_k, precision=precision,
                            max_dense=max_dense, force=force, resume=resume, on_layer=tick)
    _warn(loaded.warnings, quiet)
    title = f"run {frame.attrs['run_id']}: {loaded.name} ({loaded.format}, {len(loaded.layers)} layers)"
    if output_format == "table":
        _print_profile_table(frame, title)
    else:
        emit(frame, output_format)
    if loaded.skipped and output_format == "table" and not quiet:
        _console().print(f"{len(loaded.skipped)} node(s) not profiled: see 'specprof layers'")


_EXPORTER_NAME = re.compile(r"^/(?:[^/]+/)*([^/]+)/(?:Conv|ConvTranspose|Gemm|MatMul)(?:_\d+)?$")


def short_name(name: str) -> str:
    """``features.0`` for torch's exporter names like ``/features/features.0/Conv``."""
    match = _EXPORTER_NAME.match(name)
    return match.group(1) if match else name


def _print_profile_table(frame: Any, title: str) -> None:
    """The per-layer table of a run, compact enough for a 120-column terminal."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold")
    for name, justify in (("#", "right"), ("layer", "left"), ("op", "left"),
                          ("backend", "left"), ("σ_max", "right"), ("σ_min", "right"),
                          ("n", "right"), ("bounds on σ_max", "right"), ("time", "right"),
                          ("why", "left")):
        table.add_column(name, justify=justify,  # type: ignore[arg-type]
                         no_wrap=name not in ("layer", "op", "why"), overflow="fold")
    for row in frame.itertuples(index=False):
        ok = row.status in ("ok", "reused")
        bounds = _bounds(row.lower_bound, row.upper_bound)
        backend = row.backend if row.status == "ok" else f"{row.backend} ({row.status})"
        table.add_row(
            str(row.index), short_name(row.layer), row.shape,
            backend if ok else f"[red]{backend}[/]",
            f"{row.sigma_max:.4g}" if ok else "", f"{row.sigma_min:.4g}" if ok else "",
            str(row.n_values) if ok else "", bounds,
            f"{row.seconds:.2f} s" if row.status == "ok" else "", row.reason)
    _print_wide(table)


@cli.command()
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
    from specprof.engine.plugins import Registry
    from specprof.engine.profile import ProfileConfig, validate_backends
    from specprof.engine.store import Store

    registry = Registry.from_manager()
    config = ProfileConfig(backends=tuple(b.strip() for b in backends.split(",")),
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

    table = Table(title=title, title_justify="left", header_style="bold")
    for name in ("#", "layer", "backend", "σ_max", "rel. error", "all values", "bounds",
                 "brackets", "time"):
        table.add_column(name, justify="left" if name in ("layer", "backend") else "right",
                         overflow="fold")
    previous = None
    for row in frame.itertuples(index=False):
        backend = row.backend + (f" ({row.boundary})" if row.fallback else "")
        if row.status not in ("ok", "reused"):
            backend += f" ({row.status})"
        bounds = _bounds(row.lower_bound, row.upper_bound)
        brackets = "" if _missing(row.brackets) else ("yes" if row.brackets else "[red]NO[/]")
        first = row.index != previous
        seconds = "" if _missing(row.seconds) else f"{row.seconds:.3f} s"
        table.add_row(str(row.index) if first else "", short_name(row.layer) if first else "",
                      backend, _number(row.sigma_max, ".6g"), _number(row.rel_error, ".2%"),
                      _number(row.spectrum_error, ".2%"), bounds, brackets, seconds)
        previous = row.index
    _print_wide(table)
    _console().print("rel. error: |σ_max - exact| / exact;  all values: mean |σ_i - exact_i| / "
                     "exact σ_max;  (circular): the backend answers the periodic operator only",
                     highlight=False)


def _warn(warnings: tuple[str, ...], quiet: bool) -> None:
    console = _console(quiet)
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


@cli.command()
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
    rows = [{"index": layer.index, "layer": layer.name, "op_type": layer.op_type,
             "shape": layer.describe(), "weight": "x".join(map(str, layer.weight.shape)),
             "input": "x".join(map(str, layer.input_shape or ())) or "unknown",
             "status": "profiled", "reason": layer.note} for layer in loaded.layers]
    rows += [{"index": None, "layer": node.name, "op_type": node.op_type, "shape": "",
              "weight": "", "input": "", "status": "skipped", "reason": node.reason}
             for node in loaded.skipped]
    title = (f"{loaded.name}: imported by '{loaded.format}' ({loaded.framework}), opset "
             f"{loaded.opset}, {len(loaded.layers)} layers, {loaded.n_params:,} parameters")
    _warn(loaded.warnings, output_format != "table")
    emit(pd.DataFrame(rows), output_format, title)


def _plugin_rows(kind: str | None = None) -> list[dict[str, Any]]:
    from specprof.engine.plugins import Registry

    registry = Registry.from_manager()
    rows = []
    for plugin_kind, name, support, origin in registry.availability():
        if kind and plugin_kind != kind:
            continue
        table = {"importer": registry.importers, "backend": registry.backends,
                 "analyzer": registry.analyzers}[plugin_kind]
        cls = table[name]
        rows.append({"kind": plugin_kind, "name": name,
                     "spectrum": getattr(cls, "kind", ""),
                     "exact": getattr(cls, "exact", ""),
                     "available": "yes" if support else f"no: {support.reason}",
                     "from": "built-in" if origin.startswith("specprof.plugins.") else origin,
                     "description": cls.description})
    return rows


@cli.command()
@click.option("--output-format", type=OUTPUT_FORMATS, default="table", show_default=True)
def backends(output_format: str) -> None:
    """List the backends, what they compute, and whether they can run here."""
    import pandas as pd

    frame = pd.DataFrame(_plugin_rows("backend")).drop(columns=["kind"])
    emit(frame, output_format, "backends")


@cli.command()
@click.option("--output-format", type=OUTPUT_FORMATS, default="table", show_default=True)
def plugins(output_format: str) -> None:
    """List every loaded plugin object (importers, backends, analyzers) and where it comes from."""
    import pandas as pd

    frame = pd.DataFrame(_plugin_rows()).drop(columns=["spectrum", "exact"])
    emit(frame, output_format, "plugins")


def build_cli() -> click.Group:
    """The CLI with the commands plugins add through ``specprof_register_commands``."""
    from specprof.engine import cli_store
    from specprof.engine.plugins import get_plugin_manager

    cli_store.register(cli)

    get_plugin_manager().hook.specprof_register_commands(cli=cli)
    return cli


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``specprof`` script."""
    try:
        command = build_cli()
    except SpecprofError as error:
        click.echo(f"Error: {error.one_line()}", err=True)
        sys.exit(1)
    command.main(args=argv, prog_name="specprof")
