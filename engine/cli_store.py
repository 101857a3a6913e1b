"""Commands over the results database: query, runs, delete, export, import, and ``db``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from specprof.engine.cli_common import DB_OPTION, OUTPUT_FORMATS, emit
from specprof.engine.errors import SpecprofError

QUERY_COLUMNS = ["spectrum_id", "run", "model", "layer", "block", "role", "op_type", "shape",
                 "input_shape",
                 "backend", "kind", "boundary", "status", "n_values", "sigma_max", "sigma_min",
                 "stable_rank", "seconds", "message"]
FILE_FORMATS = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def _write_frame(frame: Any, path: Path, fmt: str) -> None:
    """Write ``frame`` to a file; the format is ``fmt``, or the file's suffix for 'table'."""
    fmt = FILE_FORMATS.get(path.suffix.lower(), "csv") if fmt == "table" else fmt
    try:
        if fmt == "parquet":
            try:
                frame.to_parquet(path, index=False)
            except ImportError as error:
                raise SpecprofError("writing Parquet needs pyarrow, which is not installed",
                                    "run: pip install pyarrow, or write .csv/.json") from error
        elif fmt == "json":
            path.write_text(frame.to_json(orient="records", indent=2, date_format="iso"))
        else:
            frame.to_csv(path, index=False)
    except OSError as error:
        raise SpecprofError(f"cannot write {path}: {error.strerror or error}",
                            "choose a writable path with -o") from error


@click.command()
@DB_OPTION
@click.option("--model", help="Model name glob, e.g. 'resnet*'.")
@click.option("--layer", help="Layer name glob, e.g. 'layer4.*'.")
@click.option("--backend", help="Only this backend.")
@click.option("--kind", type=click.Choice(["operator", "filter"]), help="Only this spectrum kind.")
@click.option("--run", type=int, help="Only this run id.")
@click.option("--where", metavar="CONDITION",
              help="Summary-column filter, e.g. 'sigma_max > 3 and stable_rank < 10'.")
@click.option("--sort", metavar="COLUMN", help="Sort by COLUMN first; '-COLUMN' for descending.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many rows.")
@click.option("--values", is_flag=True, help="Include all singular values (JSON/CSV/Parquet).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv", "parquet"]),
              default="table", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to this file (format from --format, else from the suffix).")
def query(db: str | None, model: str | None, layer: str | None, backend: str | None,
          kind: str | None, run: int | None, where: str | None, sort: str | None,
          limit: int | None, values: bool, fmt: str, output: Path | None) -> None:
    """Show stored spectra, newest run first."""
    from specprof.engine.store import Store

    if fmt == "parquet" and output is None:
        raise SpecprofError("Parquet output needs a file", "add -o results.parquet")
    with Store.open(db) as store:
        frame = store.query(model=model, layer=layer, backend=backend, kind=kind, run=run,
                            values=values, limit=limit, where=where, sort=sort)
    if output is not None:
        _write_frame(frame, output, fmt)
        click.echo(f"wrote {len(frame)} rows to {output}", err=True)
        return
    columns = QUERY_COLUMNS + (["singular_values"] if values else [])
    emit(frame, fmt, columns=columns if fmt == "table" else None)


@click.command()
@DB_OPTION
@click.option("--model", help="Only runs of models matching this glob.")
@click.option("--format", "fmt", type=OUTPUT_FORMATS, default="table", show_default=True)
def runs(db: str | None, model: str | None, fmt: str) -> None:
    """List runs, newest first, with status and result counts.

    Runs of this host left 'running' by a process that no longer exists are marked
    interrupted first.
    """
    from specprof.engine.store import Store

    with Store.open(db) as store:  # opening marks dead runs interrupted
        frame = store.runs()
    for column in ("started", "finished"):  # emit's JSON takes text, not timestamps
        frame[column] = [None if value is None or value != value else value.isoformat(
            sep=" ", timespec="seconds") for value in frame[column]]
    if model is not None:
        import fnmatch

        frame = frame[[fnmatch.fnmatch(name.lower(), model.lower()) for name in frame["model"]]]
    emit(frame, fmt, "runs")


@click.command()
@DB_OPTION
@click.option("--run", type=int, help="Delete this run and its results.")
@click.option("--model", help="Delete every model with this exact name, its runs and results.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def delete(db: str | None, run: int | None, model: str | None, yes: bool) -> None:
    """Delete a run, or a model with all its runs, in one transaction."""
    from specprof.engine.store import Store

    if (run is None) == (model is None):
        raise SpecprofError("delete needs exactly one of --run or --model",
                            "pass --run ID or --model NAME")
    what = f"run {run}" if run is not None else f"model {model!r} with all its runs"
    with Store.open(db) as store:
        if not yes:
            click.confirm(f"Delete {what} from {store.display_url}?", abort=True)
        gone = store.delete(run=run, model=model)
    click.echo(f"deleted {gone['runs']} run(s) and {gone['results']} layer result(s)")


@click.command("export")
@DB_OPTION
@click.option("--run", type=int, required=True, help="The run to export.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The JSON file to write (schemas/run-export.schema.json).")
def export_command(db: str | None, run: int, output: Path) -> None:
    """Write a whole run (model, layers, results, analyses) as one JSON document."""
    from specprof.engine.store import Store

    with Store.open(db) as store:
        document = store.export_run(run)
    try:
        output.write_text(json.dumps(document))
    except OSError as error:
        raise SpecprofError(f"cannot write {output}: {error.strerror or error}",
                            "choose a writable path with -o") from error
    click.echo(f"exported run {run} ({len(document['results'])} results) to {output}", err=True)


@click.command("import")
@DB_OPTION
@click.argument("document", type=click.Path(dir_okay=False, path_type=Path))
def import_command(db: str | None, document: Path) -> None:
    """Store a run exported by 'specprof export' as a new run of this database."""
    from specprof.engine.store import Store

    with Store.open(db) as store:
        run_id = store.import_file(document)
    click.echo(f"imported as run {run_id}")


@click.group()
def db() -> None:
    """Manage the results database."""


@db.command("upgrade")
@DB_OPTION
def db_upgrade(db: str | None) -> None:
    """Bring the database schema up to date (creates it if new)."""
    from specprof.engine.store import Store

    before, after = Store.upgrade_url(db)
    click.echo(f"database at revision {after}" + (f" (was {before})" if before != after else ""))


COMMANDS: tuple[click.Command, ...] = (query, runs, delete, export_command, import_command, db)
"""This module's commands, which ``specprof.engine.cli`` adds to the ``specprof`` group."""
