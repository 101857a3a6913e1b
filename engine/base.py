"""The three kinds of plugin object: importers, backends and analyzers.

Each is a small ABC whose capabilities are class attributes, so that the engine (and
``specprof plugins``) can list and choose them without instantiating or importing anything
heavy. ``available()`` never raises: it answers with a ``Support`` naming what is missing.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from specprof.engine.errors import printable
from specprof.engine.types import Layer, Request, Spectrum, SpectrumKind, Support, WeightTensor

if TYPE_CHECKING:
    import onnx
    import pandas as pd
    from rich.console import Console

    from specprof.engine.store import Store
    from specprof.engine.types import LoadedModel

NOMINAL_FLOPS = 1e10
"""Floating-point operations per second that ``Backend.cost`` estimates assume: about one
modern CPU core on LAPACK. Costs only need to compare backends with each other, so one
nominal rate for all keeps them comparable across plugins."""


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    """The modules of ``modules`` that cannot be imported here (found without importing)."""
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(module)
    return missing


class PluginObject:
    """What every importer, backend and analyzer declares: its name and what it needs."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    """Modules that must be importable for this plugin to work."""
    extra: ClassVar[str | None] = None
    """The specprof extra that installs ``requires``."""

    @classmethod
    def available(cls) -> Support:
        """Whether this plugin's dependencies are installed; never raises."""
        missing = missing_modules(cls.requires)
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


class Importer(PluginObject, ABC):
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


class WeightsImporter(Importer):
    """Reads a checkpoint of named tensors (safetensors, GGUF, a state dict, a LoRA adapter)
    without any graph: the weights road of DESIGN.md section 8.

    It is found like any importer (``suffixes``, ``sniff``, ``--format``), but the engine
    calls ``load_weights`` instead of ``load`` wherever ``reads_weights`` says yes, and turns
    each floating tensor of two or more dimensions into a matrix layer itself (see
    ``specprof.engine.loading.layers_from_tensors``).
    """

    def reads_weights(self, path: Path, options: ImportOptions) -> bool:
        """True when ``path`` is read weights-only (an importer with a graph road too, such as
        the PyTorch one with ``--model-class``, answers per file)."""
        return True

    @abstractmethod
    def load_weights(self, path: Path, options: ImportOptions) -> Iterator[WeightTensor]:
        """The file's tensors, in file order, each read only when the engine asks.
        Raise ``ModelLoadError`` with a hint for bad input."""

    def load(self, source: Path | Any, options: ImportOptions) -> onnx.ModelProto:
        from specprof.engine.errors import ModelLoadError

        raise ModelLoadError(f"the '{self.name}' importer reads weights only: it has no graph",
                             "profile the checkpoint file itself (specprof profile PATH)")


class Backend(PluginObject, ABC):
    """Computes one kind of spectrum of a layer.

    ``exact`` says whether the values it returns are the true singular values (up to
    floating-point error) of what it was asked; ``cost`` estimates what that takes, so that
    ``auto`` can weigh every installed backend, third-party ones included.
    """

    kind: ClassVar[SpectrumKind]
    exact: ClassVar[bool]
    devices: ClassVar[tuple[str, ...]] = ("cpu",)

    def supports(self, layer: Layer, request: Request) -> Support:
        """Whether ``compute`` can handle this layer and request, and if not, why."""
        return Support.yes()

    def cost(self, layer: Layer, request: Request) -> float | None:
        """Estimated seconds of ``compute`` on this layer and request, at ``NOMINAL_FLOPS``.

        Called only where ``supports`` said yes. None (the default) means "no estimate":
        ``auto`` then considers this backend only where the user prefers it by name.
        """
        return None

    def memory(self, layer: Layer, request: Request) -> int | None:
        """Estimated peak bytes ``compute`` allocates on this layer and request, on the high
        side (every array of every phase added up), without allocating anything.

        Called only where ``supports`` said yes; the profiler refuses the backend on a layer
        whose estimate is above ``request.max_memory``. None (the default): no estimate, never
        refused."""
        return None

    @abstractmethod
    def compute(self, layer: Layer, request: Request) -> Spectrum:
        """Singular values of ``layer``. Called only after ``supports`` said yes.

        A backend that returns only the largest values (``request.top_k``, or a norm-only
        method) says so with ``Spectrum(..., complete=False)``."""


@dataclass
class AnalysisContext:
    """What an analyzer gets to work with: the open store, where to say things, its options.

    Analyzers read the stored results through ``store`` and write their metrics back through
    it; ``say`` prints a note for the user (stderr, so tables and JSON on stdout stay clean);
    ``load_model`` and ``profile`` give access to the engine's import and profile stages for
    analyzers that need the weights or a spectrum not yet stored.
    """

    store: Store
    options: dict[str, Any] = field(default_factory=dict)
    console: Console | None = None
    quiet: bool = False
    load_model: Callable[..., LoadedModel] | None = None
    profile: Callable[..., int] | None = None
    """``profile(model, backends) -> run id``: profile a loaded model into ``store``."""
    progress: Callable[[int | None, str], AbstractContextManager[Callable[[Any], None]]] | None = None
    """``progress(total, description)``: a context giving a callback to call per item done."""

    def say(self, text: str) -> None:
        """Print a note for the user (plain text: brackets are not markup)."""
        if self.console is not None and not self.quiet:
            self.console.print(printable(text), markup=False, highlight=False)

    def load(self, source: Any, **options: Any) -> LoadedModel:
        """Import a model (a path or a framework object) with ``load_model``, or the engine's
        own loader when the context was given none."""
        if self.load_model is not None:
            return self.load_model(source, **options)
        from specprof.engine.loading import load_model

        return load_model(source, **options)

    def track(self, total: int | None, description: str
              ) -> AbstractContextManager[Callable[[Any], None]]:
        """A progress bar over ``total`` items (none when quiet or not on a terminal)::

            with context.track(len(layers), "analyzing") as tick:
                for layer in layers:
                    ...
                    tick(layer)
        """
        if self.progress is None or self.quiet:
            return nullcontext(lambda _item: None)
        return self.progress(total, description)


class Analyzer(PluginObject, ABC):
    """Reads stored results and writes derived metrics back to the store."""

    @abstractmethod
    def analyze(self, context: AnalysisContext, run_id: int) -> pd.DataFrame:
        """Analyze one stored run; returns a per-layer (or per-item) DataFrame."""
