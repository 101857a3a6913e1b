"""Building the plugin manager and the registries of importers, backends and analyzers.

Nothing here runs at import time: ``get_plugin_manager()`` builds a fresh manager on each call,
and callers keep it as long as they need (the ``Registry`` does).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import pluggy

from specprof.engine import hookspecs
from specprof.engine.base import Analyzer, Backend, Importer
from specprof.engine.errors import SpecprofError
from specprof.engine.types import Support

PROJECT = "specprof"
DEFAULT_PLUGINS: tuple[str, ...] = (
    "specprof.plugins.importers.onnx_importer",
    "specprof.plugins.importers.torch_importer",
    "specprof.plugins.importers.keras_importer",
    "specprof.plugins.importers.tflite_importer",
    "specprof.plugins.importers.jax_importer",
    "specprof.plugins.importers.sklearn_importer",
    "specprof.plugins.backends.exact",
    "specprof.plugins.backends.filter",
    "specprof.plugins.backends.fft_circulant",
    "specprof.plugins.backends.toeplitz",
    "specprof.plugins.backends.selection",
    "specprof.plugins.analyzers.spectral",
    "specprof.plugins.analyzers.hypergraph",
)
DISABLE_ENV = "SPECPROF_DISABLED_PLUGINS"


def _disabled() -> set[str]:
    return {name.strip() for name in os.environ.get(DISABLE_ENV, "").split(",") if name.strip()}


def get_plugin_manager(
    default_plugins: Iterable[str] = DEFAULT_PLUGINS, entry_points: bool = True
) -> pluggy.PluginManager:
    """A plugin manager with the built-in plugins and those installed through entry points.

    ``SPECPROF_DISABLED_PLUGINS`` (comma-separated plugin or module names) turns plugins off;
    ``*`` turns off all third-party ones.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    disabled = _disabled()
    for module_name in default_plugins:
        if module_name in disabled or module_name.rsplit(".", 1)[-1] in disabled:
            continue
        pm.register(importlib.import_module(module_name), name=module_name)
    if entry_points and "*" not in disabled:
        _load_entry_points(pm, disabled)
    return pm


def _load_entry_points(pm: pluggy.PluginManager, disabled: set[str]) -> None:
    """Register third-party plugins; one that fails to import is named, with how to skip it."""
    for entry_point in importlib.metadata.entry_points(group=PROJECT):
        if entry_point.name in disabled or pm.get_plugin(entry_point.name) is not None:
            continue
        dist = entry_point.dist
        origin = f"{dist.name} {dist.version}" if dist is not None else entry_point.value
        try:
            plugin = entry_point.load()
        except Exception as error:  # a broken third-party package must not hide the cause
            raise SpecprofError(
                f"plugin '{entry_point.name}' ({origin}) failed to load: "
                f"{type(error).__name__}: {error}",
                f"fix or uninstall it, or set {DISABLE_ENV}={entry_point.name}",
            ) from error
        pm.register(plugin, name=entry_point.name)


@dataclass
class Registry:
    """The importers, backends and analyzers the plugins provide, by name."""

    pm: pluggy.PluginManager
    importers: dict[str, type[Importer]] = field(default_factory=dict)
    backends: dict[str, type[Backend]] = field(default_factory=dict)
    analyzers: dict[str, type[Analyzer]] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    _instances: dict[str, Backend] = field(default_factory=dict, repr=False)
    """Backends already checked and built: a run asks for them once per layer."""

    @classmethod
    def from_manager(cls, pm: pluggy.PluginManager | None = None) -> Registry:
        pm = pm or get_plugin_manager()
        registry = cls(pm)
        hooks: list[tuple[Any, dict[str, Any], type]] = [
            (pm.hook.specprof_register_importers, registry.importers, Importer),
            (pm.hook.specprof_register_backends, registry.backends, Backend),
            (pm.hook.specprof_register_analyzers, registry.analyzers, Analyzer),
        ]
        for hook, table, base in hooks:
            for impl in hook.get_hookimpls():
                for plugin_class in impl.function() or []:
                    if not (isinstance(plugin_class, type) and issubclass(plugin_class, base)):
                        raise SpecprofError(
                            f"plugin {impl.plugin_name} registered {plugin_class!r}, "
                            f"which is not a {base.__name__} subclass",
                            f"fix the plugin or disable it with {DISABLE_ENV}={impl.plugin_name}",
                        )
                    name = cast(Any, plugin_class).name
                    table.setdefault(name, plugin_class)
                    registry.origins.setdefault(f"{base.__name__}:{name}", impl.plugin_name)
        return registry

    def backend(self, name: str) -> Backend:
        """An instance of the named backend; a clear error if unknown or unavailable."""
        if name not in self.backends:
            known = ", ".join(sorted(self.backends)) or "none"
            raise SpecprofError(f"unknown backend '{name}'", f"choose one of: auto, {known}")
        if name not in self._instances:
            backend_class = self.backends[name]
            support = backend_class.available()
            if not support:
                raise SpecprofError(f"backend '{name}' is unavailable ({support.reason})")
            self._instances[name] = backend_class()
        return self._instances[name]

    def available_backends(self) -> dict[str, Backend]:
        """Instances of every backend whose dependencies are installed, by name."""
        return {name: self.backend(name) for name, cls in sorted(self.backends.items())
                if name in self._instances or cls.available()}

    def availability(self) -> list[tuple[str, str, Support, str]]:
        """(kind, name, availability, origin) of every registered plugin object."""
        rows = []
        for kind, table in (("importer", self.importers), ("backend", self.backends),
                            ("analyzer", self.analyzers)):
            for name, plugin_class in sorted(table.items()):
                origin = self.origins.get(f"{kind.capitalize()}:{name}", "?")
                rows.append((kind, name, plugin_class.available(), origin))
        return rows
