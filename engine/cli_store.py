"""Commands over the results database: query, and schema management (``db``)."""

from __future__ import annotations

import click

from specprof.engine.cli import DB_OPTION, OUTPUT_FORMATS, emit

QUERY_COLUMNS = ["run", "model", "layer", "op_type", "shape", "input_shape", "backend", "kind",
                 "boundary", "status", "n_values", "sigma_max", "sigma_min", "seconds", "message"]


@click.command()
@DB_OPTION
@click.option("--model", help="Model name glob, e.g. 'resnet*'.")
@click.option("--layer", help="Layer name glob.")
@click.option("--backend", help="Only this backend.")
@click.option("--kind", type=click.Choice(["operator", "filter"]), help="Only this spectrum kind.")
@click.option("--run", type=int, help="Only this run id.")
@click.option("--values", is_flag=True, help="Include all singular values (JSON/CSV).")
@click.option("--format", "fmt", type=OUTPUT_FORMATS, default="table", show_default=True)
def query(db: str | None, model: str | None, layer: str | None, backend: str | None,
          kind: str | None, run: int | None, values: bool, fmt: str) -> None:
    """Show stored spectra, newest run first."""
    from specprof.engine import api

    frame = api.query(db=db, model=model, layer=layer, backend=backend, kind=kind, run=run,
                      values=values)
    columns = QUERY_COLUMNS + (["singular_values"] if values else [])
    emit(frame, fmt, columns=columns if fmt == "table" else None)


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



def register(cli: click.Group) -> None:
    """Add this module's commands to the ``specprof`` group."""
    for command in (query, db):
        cli.add_command(command)
