"""Every hook specprof calls. Plugins implement them with ``@specprof.engine.hookimpl``.

A plugin is any module or object with such functions, registered through the ``specprof``
entry-point group (or listed in ``DEFAULT_PLUGINS`` for the built-ins).
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("specprof")


@hookspec
def specprof_register_importers() -> list[type]:
    """Return ``Importer`` subclasses this plugin provides."""


@hookspec
def specprof_register_backends() -> list[type]:
    """Return ``Backend`` subclasses this plugin provides."""


@hookspec
def specprof_register_analyzers() -> list[type]:
    """Return ``Analyzer`` subclasses this plugin provides."""


@hookspec
def specprof_register_commands(cli: Any) -> None:
    """Add commands to the ``specprof`` click group ``cli``."""


@hookspec(firstresult=True)
def specprof_select_backend(layer: Any, request: Any, backends: dict[str, Any]) -> Any:
    """Pick the backend for ``layer`` when the user asked for ``auto``.

    ``backends`` maps names to available backend instances. Return a ``(name, reason)`` pair,
    or None to let the next plugin decide. The first non-None answer wins.
    """


@hookspec
def specprof_layer_done(run_id: int | None, layer: Any, spectrum: Any, reused: bool) -> None:
    """Called after each layer result is stored (``reused``: taken from the store, not computed)."""
