"""Progress reporting for long commands: a rich bar on a terminal, nothing otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def layer_progress(total: int | None, description: str, quiet: bool = False) -> Iterator[Callable[[Any], None]]:
    """Yield a callback to call once per finished task; draws a bar only on an interactive stderr."""
    if quiet or not sys.stderr.isatty():
        yield lambda _outcome: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(description, total=total)

        def tick(_outcome: Any) -> None:
            bar.advance(task)

        yield tick
