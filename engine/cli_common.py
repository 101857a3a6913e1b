"""What every ``specprof`` command shares, for built-in and plugin commands alike.

Plugin commands (``specprof_register_commands``) take their options, output and messages from
here, so that they look and behave like the built-in ones: ``DB_OPTION``, ``OUTPUT_FORMATS``,
``emit`` for result tables, ``console`` for notes on stderr, and ``SpecprofGroup`` turning a
``SpecprofError`` into one line and exit status 1. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Any

import click

from specprof.engine.errors import SpecprofError, printable
from specprof.engine.jsonable import jsonable

if TYPE_CHECKING:
    from rich.console import Console

OUTPUT_FORMATS = click.Choice(["table", "json", "csv"])
DB_OPTION = click.option(
    "--db", metavar="URL",
    help="Database: a SQLite file path or an SQLAlchemy URL (postgresql://...). "
         "Default: $SPECPROF_DB, else ~/.local/share/specprof/specprof.db.")
MIN_TABLE_WIDTH = 120


class SpecprofGroup(click.Group):
    """Turns a ``SpecprofError`` anywhere below into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SpecprofError as error:
            raise click.ClickException(error.one_line()) from None


def console(quiet: bool = False) -> Console:
    """A rich console on stderr for notes and warnings (stdout stays for results).

    Its ``print`` reads markup: pass ``markup=False`` (or ``rich.markup.escape``) for any text
    that comes from a model, a file or a user, so that brackets in it are printed as they are.
    """
    from rich.console import Console

    return Console(stderr=True, quiet=quiet)


def warn(warnings: list[str] | tuple[str, ...], quiet: bool = False) -> None:
    """Print each warning on stderr as ``warning: TEXT`` (TEXT printed literally)."""
    from rich.markup import escape

    out = console(quiet)
    for warning in warnings:
        out.print(f"[yellow]warning:[/] {escape(printable(warning))}", highlight=False)


def is_missing(value: Any) -> bool:
    """None or NaN: a table cell with nothing to show."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def number(value: Any, fmt: str) -> str:
    """``value`` formatted with ``fmt``, or '' when missing."""
    return "" if is_missing(value) else format(value, fmt)


def bounds_text(lower: Any, upper: Any) -> str:
    """``[lower, upper]`` of a spectral norm, or '' when the backend gave no bounds."""
    if is_missing(lower) and is_missing(upper):
        return ""
    return f"[{number(lower, '.4g')}, {number(upper, '.4g')}]"


_EXPORTER_NAME = re.compile(r"^/(?:[^/]+/)*([^/]+)/(?:Conv|ConvTranspose|Gemm|MatMul)(?:_\d+)?$")


def short_name(name: str) -> str:
    """``features.0`` for torch's exporter names like ``/features/features.0/Conv``."""
    match = _EXPORTER_NAME.match(name)
    return match.group(1) if match else name


def print_wide(table: Any) -> None:
    """Print a rich table at least ``MIN_TABLE_WIDTH`` columns wide, also when not a terminal."""
    from rich.console import Console

    Console(width=max(MIN_TABLE_WIDTH, Console().width)).print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return number(value, ".4g")
    if isinstance(value, list):
        return f"[{len(value)} values]"
    return "" if value is None else printable(str(value))


def print_table(frame: Any, title: str = "") -> None:
    """A DataFrame as a rich table on stdout; cells are text, never markup."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(printable(title)) if title else None, title_justify="left")
    for column in frame.columns:
        numeric = frame[column].dtype.kind in "fiu"
        table.add_column(Text(printable(str(column))), justify="right" if numeric else "left",
                         overflow="fold")
    layer_column = list(frame.columns).index("layer") if "layer" in frame.columns else -1
    for row in frame.itertuples(index=False):
        cells = [_cell(v) for v in row]
        if layer_column >= 0:
            cells[layer_column] = short_name(cells[layer_column])
        table.add_row(*(Text(cell) for cell in cells))
    print_wide(table)


def emit(frame: Any, fmt: str, title: str = "", columns: list[str] | None = None) -> None:
    """Write a DataFrame to stdout as a rich table, JSON records (NaN -> null) or CSV."""
    if columns is not None:
        frame = frame[[c for c in columns if c in frame.columns]]
    if fmt == "json":
        click.echo(json.dumps([jsonable(row) for row in frame.to_dict("records")], indent=2))
    elif fmt == "csv":
        click.echo(frame.to_csv(index=False), nl=False)
    else:
        print_table(frame, title)
