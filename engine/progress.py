"""Progress reporting for long commands: a rich bar on a terminal, nothing otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def layer_progress(total: int | None, description: str, quiet: bool = False) -> Iterator[Callable[[Any], None]]:
    """Yield a callback to call once per finished task; draws a bar only on an interactive stderr."""
    with run_progress(quiet) as tracker:
        tracker.grow(total, description)
        yield tracker


class Tracker:
    """One bar over many runs: ``grow`` adds a run's tasks to the total as it starts, calling
    the tracker advances it by one, ``say`` prints a line above it. Without a bar (not a
    terminal, or quiet) ticks do nothing and ``say`` writes to stderr unless quiet."""

    def __init__(self, bar: Any = None, quiet: bool = False) -> None:
        self._bar = bar
        self._quiet = quiet
        self._task = bar.add_task("", total=None) if bar is not None else None

    def __call__(self, _outcome: Any = None) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def grow(self, tasks: int | None, description: str) -> None:
        """Add ``tasks`` to the bar's total (None: unknown) and show ``description``."""
        if self._bar is None:
            return
        from rich.markup import escape

        current = self._bar.tasks[0].total
        total = current if tasks is None else (current or 0) + tasks
        self._bar.update(self._task, total=total, description=escape(description))

    def say(self, text: str) -> None:
        """A line for the user on stderr (plain text, not markup), above the bar if there is one."""
        if self._quiet:
            return
        if self._bar is not None:
            from rich.text import Text

            self._bar.console.print(Text(text))
        else:
            print(text, file=sys.stderr, flush=True)


@contextmanager
def run_progress(quiet: bool = False, bar: bool = True) -> Iterator[Tracker]:
    """A ``Tracker`` whose bar (with ``bar``, on an interactive stderr only) is gone when the
    block ends."""
    if quiet or not bar or not sys.stderr.isatty():
        yield Tracker(quiet=quiet)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True, console=Console(stderr=True)) as live:
        yield Tracker(live)
