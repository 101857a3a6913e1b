"""The matrix behind a stored spectrum: its shape and a certified bound on its norm.

Shared by the ``spectral`` analyzer and the HTML report; works from stored layer rows (no
weights needed), through the engine's own shape logic.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from specprof.engine.errors import SpecprofError
from specprof.engine.types import Layer, Spectrum


def _prod(values: Any) -> int:
    return int(math.prod(int(v) for v in values))


def layer_from_row(row: dict[str, Any]) -> Layer:
    """A weightless ``Layer`` (zeros of the stored shape) rebuilt from a stored layer row, so
    the engine's own shape logic (``operator_shape``) answers for it."""
    return Layer(name=row["name"], op_type=row["op_type"],
                 weight=np.zeros(row["weight_shape"], dtype=np.float32),
                 strides=tuple(row.get("strides") or ()), pads=tuple(row.get("pads") or ()),
                 dilations=tuple(row.get("dilations") or ()), groups=int(row.get("groups") or 1),
                 output_padding=tuple(row.get("output_padding") or ()),
                 input_shape=None if row.get("input_shape") is None else tuple(row["input_shape"]),
                 output_shape=None if row.get("output_shape") is None else tuple(row["output_shape"]),
                 index=int(row.get("index") or 0))


def matrix_shape(row: dict[str, Any], spectrum: Spectrum) -> tuple[int, int] | None:
    """(rows, cols) of the matrix whose singular values ``spectrum`` holds; None if unknown.

    filter: the unfolded weight ``reshape(W, W.shape[0], -1)`` (DeepDataProfiler); operator:
    the layer's map on one sample (output size x input size, for the spectrum's boundary).
    """
    weight_shape = list(row["weight_shape"])
    if spectrum.kind == "filter" or row["op_type"] in ("Gemm", "MatMul"):
        return int(weight_shape[0]), _prod(weight_shape[1:])
    if row.get("input_shape") is None:
        return None
    from specprof.engine.operator import operator_shape

    try:
        rows, cols = operator_shape(layer_from_row(row), spectrum.boundary or "zeros")
    except SpecprofError:
        return None
    return (rows, cols) if rows > 0 and cols > 0 else None


def layer_norm_bound(row: dict[str, Any], spectrum: Spectrum) -> tuple[float | None, str]:
    """A certified upper bound of the layer's operator norm from this spectrum, and how.

    - operator, exact: its sigma_max; operator, approximate: the stored certified
      ``upper_bound`` (toeplitz), never the approximate sigma_max, which may be below the norm.
    - filter of a matrix layer: the filter SVD is the matrix's SVD, so sigma_max (if exact).
    - filter of a convolution: sqrt(prod(kernel)) x sigma_max of the unfolded weight R. The
      operator is A = (R (x) I) S with S the stacked tap shifts (zero or circular padding,
      stride, dilation, groups all only drop or zero rows of S), and ||S||^2 <= number of taps.
    """
    if spectrum.values.size == 0:
        return None, "no values"
    if spectrum.kind == "operator":
        if spectrum.exact:
            return spectrum.sigma_max, "exact sigma_max"
        if spectrum.upper_bound is not None and math.isfinite(spectrum.upper_bound):
            return float(spectrum.upper_bound), "certified upper bound"
        return None, "approximate spectrum without a certified upper bound"
    if not spectrum.exact:
        return None, "approximate filter spectrum"
    if row["op_type"] in ("Gemm", "MatMul"):
        return spectrum.sigma_max, "exact sigma_max"
    taps = _prod(list(row["weight_shape"])[2:])
    return math.sqrt(taps) * spectrum.sigma_max, f"sqrt({taps}) x filter sigma_max"
