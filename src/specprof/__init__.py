"""specprof: profile the singular values of neural-network layers.

The public API is loaded on first use, so ``import specprof`` stays fast and imports no
framework (torch, onnxruntime, ...)::

    import specprof
    table = specprof.profile("model.onnx")            # per-layer table, stored in the database
    stored = specprof.query(model="resnet*", values=True)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = {
    "profile": "specprof.engine.api",
    "query": "specprof.engine.api",
    "load_model": "specprof.engine.api",
    "singular_values": "specprof.engine.api",
    "load_spectrum": "specprof.engine.api",
    "hypergraph": "specprof.plugins.analyzers.hypergraph",
    "Layer": "specprof.engine.types",
    "Spectrum": "specprof.engine.types",
    "Request": "specprof.engine.types",
    "Support": "specprof.engine.types",
    "LoadedModel": "specprof.engine.types",
    "Importer": "specprof.engine.base",
    "Backend": "specprof.engine.base",
    "Analyzer": "specprof.engine.base",
    "SpecprofError": "specprof.engine.errors",
    "hookimpl": "specprof.engine",
}

__all__ = [
    "Analyzer",
    "Backend",
    "Importer",
    "Layer",
    "LoadedModel",
    "Request",
    "SpecprofError",
    "Spectrum",
    "Support",
    "hookimpl",
    "hypergraph",
    "load_model",
    "load_spectrum",
    "profile",
    "query",
    "singular_values",
]

if TYPE_CHECKING:
    from specprof.engine import hookimpl
    from specprof.engine.api import load_model, load_spectrum, profile, query, singular_values
    from specprof.engine.base import Analyzer, Backend, Importer
    from specprof.engine.errors import SpecprofError
    from specprof.engine.types import Layer, LoadedModel, Request, Spectrum, Support
    from specprof.plugins.analyzers.hypergraph import hypergraph


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'specprof' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
