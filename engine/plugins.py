"""The plugin manager and the one registry of importers, backends and analyzers per process.

Nothing runs at import time. ``get_registry()`` builds the registry on first use and keeps it
(as xarray keeps its list of engines), keyed by the settings that shape it, so the CLI, the
Python API and the profiler share one; ``get_registry.cache_clear()`` forgets it.

Rules of the registry:
- Built-ins (``DEFAULT_PLUGINS``) are registered first, then third-party plugins from the
  ``specprof`` entry-point group, each with its origin: the distribution and its version.
- A name registered twice keeps the first registration and records a warning naming both
  origins; a third-party plugin replaces a built-in of the same name only when the user says
  so in ``SPECPROF_OVERRIDE_PLUGINS`` (comma-separated names).
- A third-party plugin that fails to load is recorded as broken, with the error and how to
  turn it off, and skipped: it never stops ``--help`` or ``--version``.
- ``SPECPROF_DISABLED_PLUGINS`` (comma-separated plugin or module names; ``*`` for every
  third-party plugin) turns plugins off.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import pluggy

from specprof import __version__
from specprof.engine import hookspecs
from specprof.engine.base import Analyzer, Backend, Importer, PluginObject
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
    "specprof.plugins.importers.lora_importer",
    "specprof.plugins.importers.safetensors_importer",
    "specprof.plugins.importers.gguf_importer",
    "specprof.plugins.backends.exact",
    "specprof.plugins.backends.filter",
    "specprof.plugins.backends.fft_circulant",
    "specprof.plugins.backends.toeplitz",
    "specprof.plugins.backends.selection",
    "specprof.plugins.analyzers.spectral",
    "specprof.plugins.analyzers.hypergraph",
    "specprof.plugins.serve.plugin",
)
DISABLE_ENV = "SPECPROF_DISABLED_PLUGINS"
OVERRIDE_ENV = "SPECPROF_OVERRIDE_PLUGINS"
BUILT_IN = f"specprof {__version__} (built-in)"
KINDS: dict[str, type[PluginObject]] = {"importer": Importer, "backend": Backend,
                                        "analyzer": Analyzer}


def _names(variable: str) -> frozenset[str]:
    return frozenset(name.strip() for name in os.environ.get(variable, "").split(",")
                     if name.strip())


@dataclass(frozen=True)
class BrokenPlugin:
    """A third-party plugin that could not be loaded, and why."""

    name: str
    origin: str
    error: str

    @property
    def hint(self) -> str:
        return f"fix or uninstall {self.origin}, or set {DISABLE_ENV}={self.name}"


@dataclass
class LoadReport:
    """What loading the third-party plugins found: where each came from, and what broke."""

    origins: dict[str, str] = field(default_factory=dict)
    """Plugin name -> 'distribution version'."""
    broken: list[BrokenPlugin] = field(default_factory=list)


def get_plugin_manager(
    default_plugins: Iterable[str] = DEFAULT_PLUGINS, entry_points: bool = True,
    report: LoadReport | None = None,
) -> pluggy.PluginManager:
    """A fresh plugin manager with the built-in plugins and those installed through entry points.

    Third-party plugins that fail to import are recorded in ``report`` (when given) and
    skipped. Most callers want the shared ``get_registry()`` instead.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    disabled = _names(DISABLE_ENV)
    for module_name in default_plugins:
        if module_name in disabled or module_name.rsplit(".", 1)[-1] in disabled:
            continue
        pm.register(importlib.import_module(module_name), name=module_name)
    if entry_points and "*" not in disabled:
        _load_entry_points(pm, disabled, report if report is not None else LoadReport())
    return pm


def distribution_origin(entry_point: importlib.metadata.EntryPoint) -> str:
    """'package-name 1.2.3' of the distribution that declares ``entry_point``."""
    dist = entry_point.dist
    return f"{dist.name} {dist.version}" if dist is not None else entry_point.value


def _load_entry_points(pm: pluggy.PluginManager, disabled: frozenset[str],
                       report: LoadReport) -> None:
    """Register third-party plugins; one that fails to import is recorded, not raised."""
    for entry_point in sorted(importlib.metadata.entry_points(group=PROJECT),
                              key=lambda ep: ep.name):
        if entry_point.name in disabled or pm.get_plugin(entry_point.name) is not None:
            continue
        origin = distribution_origin(entry_point)
        try:
            plugin = entry_point.load()
            pm.register(plugin, name=entry_point.name)
        except Exception as error:  # any failure of someone else's package: keep it contained
            report.broken.append(BrokenPlugin(entry_point.name, origin,
                                              f"{type(error).__name__}: {error}"))
            continue
        report.origins[entry_point.name] = origin


@dataclass
class Registry:
    """The importers, backends and analyzers the plugins provide, by name."""

    pm: pluggy.PluginManager
    importers: dict[str, type[Importer]] = field(default_factory=dict)
    backends: dict[str, type[Backend]] = field(default_factory=dict)
    analyzers: dict[str, type[Analyzer]] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    """'kind:name' -> origin ('specprof 0.2.0 (built-in)', 'mypackage 1.0')."""
    warnings: list[str] = field(default_factory=list)
    """Name clashes and the like, for the CLI to show."""
    loaded: LoadReport = field(default_factory=LoadReport)
    _instances: dict[str, Backend] = field(default_factory=dict, repr=False)
    _available: dict[str, Backend] | None = field(default=None, repr=False)

    @classmethod
    def from_manager(cls, pm: pluggy.PluginManager | None = None,
                     overrides: frozenset[str] | None = None) -> Registry:
        """Collect what the plugins of ``pm`` register (a fresh manager when None)."""
        loaded = LoadReport()
        pm = pm or get_plugin_manager(report=loaded)
        registry = cls(pm, loaded=loaded)
        overrides = _names(OVERRIDE_ENV) if overrides is None else overrides
        tables: dict[str, dict[str, Any]] = {"importer": registry.importers,
                                             "backend": registry.backends,
                                             "analyzer": registry.analyzers}
        for kind, base in KINDS.items():
            hook = getattr(pm.hook, f"specprof_register_{kind}s")
            for impl in hook.get_hookimpls():  # in registration order: built-ins first
                for plugin_class in registry._registered(impl, kind, base):
                    registry._add(kind, tables[kind], plugin_class, impl.plugin_name, overrides)
        return registry

    def _registered(self, impl: Any, kind: str, base: type) -> list[Any]:
        """What one plugin's ``specprof_register_<kind>s`` returns, checked.

        A built-in that returns something wrong is a bug and raises; a third-party plugin
        that fails or returns a non-``base`` class is recorded as broken and left out.
        """
        name = impl.plugin_name
        built_in = self.origin_of(name) == BUILT_IN
        try:
            classes = list(impl.function() or [])
            wrong = [c for c in classes if not (isinstance(c, type) and issubclass(c, base))]
            if wrong:
                raise TypeError(f"registered {wrong[0]!r}, which is not a {base.__name__} "
                                "subclass")
        except Exception as error:  # someone else's code: contained unless it is ours
            if built_in:
                raise
            self.loaded.broken.append(BrokenPlugin(name, self.origin_of(name),
                                                   f"{type(error).__name__}: {error}"))
            return []
        return classes

    def _add(self, kind: str, table: dict[str, Any], plugin_class: Any, plugin_name: str,
             overrides: frozenset[str]) -> None:
        name = cast(Any, plugin_class).name
        origin = self.origin_of(plugin_name)
        key = f"{kind}:{name}"
        if name in table:
            first = self.origins[key]
            if first == BUILT_IN and name in overrides and origin != BUILT_IN:
                self.warnings.append(f"{kind} '{name}' from {origin} replaces the built-in one "
                                     f"({OVERRIDE_ENV})")
            else:
                self.warnings.append(
                    f"{kind} '{name}' is registered twice, by {first} and by {origin}; "
                    f"using the one from {first}"
                    + (f" (set {OVERRIDE_ENV}={name} to use the other)" if first == BUILT_IN
                       else ""))
                return
        table[name] = plugin_class
        self.origins[key] = origin

    @property
    def broken(self) -> list[BrokenPlugin]:
        return self.loaded.broken

    def origin_of(self, plugin_name: str) -> str:
        """Where a registered plugin comes from: its distribution and version, or built-in."""
        if plugin_name.startswith("specprof.plugins."):
            return BUILT_IN
        return self.loaded.origins.get(plugin_name, plugin_name)

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
        """Instances of every backend whose dependencies are installed, by name (checked once).

        In registration order, built-ins first: ``auto`` breaks ties between equal costs by it.
        """
        if self._available is None:
            self._available = {name: self.backend(name)
                               for name, cls in self.backends.items()
                               if name in self._instances or cls.available()}
        return self._available

    def analyzer(self, name: str) -> Analyzer:
        """An instance of the named analyzer; a clear error if unknown or unavailable."""
        if name not in self.analyzers:
            known = ", ".join(sorted(self.analyzers)) or "none"
            raise SpecprofError(f"unknown analyzer '{name}'", f"choose one of: {known}")
        analyzer_class = self.analyzers[name]
        support = analyzer_class.available()
        if not support:
            raise SpecprofError(f"analyzer '{name}' is unavailable ({support.reason})")
        return analyzer_class()

    def table(self, kind: str) -> dict[str, type[PluginObject]]:
        """The registered classes of one kind ('importer', 'backend' or 'analyzer')."""
        return cast(dict[str, type[PluginObject]],
                    {"importer": self.importers, "backend": self.backends,
                     "analyzer": self.analyzers}[kind])

    def availability(self) -> list[tuple[str, str, Support, str]]:
        """(kind, name, availability, origin) of every registered plugin object."""
        rows = []
        for kind in KINDS:
            for name, plugin_class in sorted(self.table(kind).items()):
                rows.append((kind, name, plugin_class.available(),
                             self.origins.get(f"{kind}:{name}", "?")))
        return rows


@functools.cache
def _shared_registry(disabled: frozenset[str], overrides: frozenset[str]) -> Registry:
    return Registry.from_manager(overrides=overrides)


def get_registry() -> Registry:
    """The registry of this process, built on first use and shared by every caller.

    Rebuilt only when ``SPECPROF_DISABLED_PLUGINS`` or ``SPECPROF_OVERRIDE_PLUGINS`` change.
    """
    return _shared_registry(_names(DISABLE_ENV), _names(OVERRIDE_ENV))


get_registry.cache_clear = _shared_registry.cache_clear  # type: ignore[attr-defined]
