"""The specprof engine: types, plugin machinery, ONNX normalization, extraction, store."""

from __future__ import annotations

import pluggy

hookimpl = pluggy.HookimplMarker("specprof")

__all__ = ["hookimpl"]
