"""The three kinds of plugin object: importers, backends and analyzers.

Each is a small ABC whose capabilities are class attributes, so that the engine (and
``specprof plugins``) can list and choose them without instantiating or importing anything
heavy. ``available()`` never raises: it answers with a ``Support`` naming what is missing.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import onnx

from specprof.engine.types import Layer, Request, Spectrum, SpectrumKind, Support


def _missing_modules(modules: tuple[str, ...]) -> list[str]:
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(module)
    return missing


class _Plugin:
    name: ClassVar[str]
    description: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    """Modules that must be importable for this plugin to work."""
    extra: ClassVar[str | None] = None
    """The specprof extra that installs ``requires``."""

    @classmethod
    def available(cls) -> Support:
        missing = _missing_modules(cls.requires)
        if not missing:
            return Support.yes()
        how = f"pip install 'specprof[{cls.extra}]'" if cls.extra else f"pip install {' '.join(missing)}"
        return Support.no(f"needs {', '.join(missing)}: {how}")


@dataclass(frozen=True)
class ImportOptions:
    """What an importer may need beyond the model itself."""

    input_shape: tuple[int, ...] | None = None
    model_class: str | None = None
    """``package.module:Class`` to rebuild a model whose file holds only a state_dict."""
    skip_unsupported: bool = False
    """Go on with what can be converted where a layer or op cannot (the user's
    ``--skip-unsupported``); importers that cannot convert part of a model say so otherwise."""


class Importer(_Plugin, ABC):
    """Turns a model (a file, or a framework object in the Python API) into ONNX."""

    framework: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]] = ()

    def sniff(self, path: Path, head: bytes) -> bool:
        """True if the file's content looks like this importer's format (``head``: first bytes)."""
        return False

    def accepts(self, obj: Any) -> bool:
        """True if this importer can convert the in-memory Python object ``obj``."""
        return False

    @abstractmethod
    def load(self, source: Path | Any, options: ImportOptions) -> onnx.ModelProto:
        """Return the model as ONNX. Raise ``ModelLoadError`` with a hint for bad input."""


class Backend(_Plugin, ABC):
    """Computes one kind of spectrum of a layer."""

    kind: ClassVar[SpectrumKind]
    exact: ClassVar[bool]
    devices: ClassVar[tuple[str, ...]] = ("cpu",)

    def supports(self, layer: Layer, request: Request) -> Support:
        """Whether ``compute`` can handle this layer and request, and if not, why."""
        return Support.yes()

    @abstractmethod
    def compute(self, layer: Layer, request: Request) -> Spectrum:
        """Singular values of ``layer``. Called only after ``supports`` said yes."""


class Analyzer(_Plugin, ABC):
    """Reads stored results and writes derived metrics back to the store."""

    @abstractmethod
    def analyze(self, store: Any, run_id: int, options: dict[str, Any]) -> Any:
        """Analyze one stored run; returns a pandas DataFrame."""
