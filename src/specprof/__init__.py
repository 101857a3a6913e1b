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
    "Boundary": "specprof.engine.types",
    "SpectrumKind": "specprof.engine.types",
    "Importer": "specprof.engine.base",
    "ImportOptions": "specprof.engine.base",
    "WeightsImporter": "specprof.engine.base",
    "WeightTensor": "specprof.engine.types",
    "Backend": "specprof.engine.base",
    "Analyzer": "specprof.engine.base",
    "AnalysisContext": "specprof.engine.base",
    "NOMINAL_FLOPS": "specprof.engine.base",
    "ConvApply": "specprof.engine.operator",
    "operator_shape": "specprof.engine.operator",
    "dense_operator": "specprof.engine.operator",
    "group_blocks": "specprof.engine.operator",
    "get_registry": "specprof.engine.plugins",
    "SpecprofError": "specprof.engine.errors",
    "BackendError": "specprof.engine.errors",
    "ModelLoadError": "specprof.engine.errors",
    "MissingExtraError": "specprof.engine.errors",
    "StoreError": "specprof.engine.errors",
    "hookimpl": "specprof.engine",
}

__all__ = [
    "NOMINAL_FLOPS",
    "AnalysisContext",
    "Analyzer",
    "Backend",
    "BackendError",
    "Boundary",
    "ConvApply",
    "ImportOptions",
    "Importer",
    "Layer",
    "LoadedModel",
    "MissingExtraError",
    "ModelLoadError",
    "Request",
    "SpecprofError",
    "Spectrum",
    "SpectrumKind",
    "StoreError",
    "Support",
    "WeightTensor",
    "WeightsImporter",
    "dense_operator",
    "get_registry",
    "group_blocks",
    "hookimpl",
    "hypergraph",
    "load_model",
    "load_spectrum",
    "operator_shape",
    "profile",
    "query",
    "singular_values",
]

if TYPE_CHECKING:
    from specprof.engine import hookimpl
    from specprof.engine.api import load_model, load_spectrum, profile, query, singular_values
    from specprof.engine.base import (
        NOMINAL_FLOPS,
        AnalysisContext,
        Analyzer,
        Backend,
        Importer,
        ImportOptions,
        WeightsImporter,
    )
    from specprof.engine.errors import (
        BackendError,
        MissingExtraError,
        ModelLoadError,
        SpecprofError,
        StoreError,
    )
    from specprof.engine.operator import ConvApply, dense_operator, group_blocks, operator_shape
    from specprof.engine.plugins import get_registry
    from specprof.engine.types import (
        Boundary,
        Layer,
        LoadedModel,
        Request,
        Spectrum,
        SpectrumKind,
        Support,
        WeightTensor,
    )
    from specprof.plugins.analyzers.hypergraph import hypergraph


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'specprof' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
