"""The default answer to "which backend for this layer?" when the user asks for ``auto``.

The policy, in order (the first available backend that supports the layer wins):
- Gemm/MatMul: ``exact`` (a plain SVD of the weight).
- circular boundary: ``fft-circulant`` (exact, O(n log n) per channel pair), then ``exact``.
- top-k asked: ``exact`` (matrix-free ARPACK; exact values at any size).
- zero padding, full spectrum: ``fft-circulant`` where zero padding cannot matter (a 1x1
  kernel with no padding: it is exact there), ``exact`` while the dense SVD is cheap, then
  ``toeplitz`` (approximate spectrum with certified bounds on sigma_max), then ``exact`` up to
  its size limit.

Third-party plugins can answer ``specprof_select_backend`` before this one (pluggy calls later
registered plugins first) to put their own backend ahead.
"""

from __future__ import annotations

from typing import Any

from specprof.engine import hookimpl
from specprof.engine.errors import SpecprofError
from specprof.engine.operator import group_blocks, operator_shape
from specprof.engine.types import Layer, Request

DENSE_FLOP_BUDGET = 2e10
"""Largest dense SVD (in flops, ~4 m n^2 per m x n block) auto runs: about a second or two on
one modern core. Above it, auto prefers an approximation with certified bounds."""


def dense_svd_flops(layer: Layer, request: Request) -> float:
    """Rough cost of the exact backend's dense SVD of ``layer`` (all its group blocks)."""
    if not layer.is_conv:
        rows, cols = layer.weight.shape
        return 4.0 * max(rows, cols) * min(rows, cols) ** 2
    blocks = group_blocks(layer)
    rows, cols = operator_shape(blocks[0], request.boundary)
    return len(blocks) * 4.0 * max(rows, cols) * min(rows, cols) ** 2


def _padding_free_pointwise(layer: Layer) -> bool:
    """1x1 kernel, stride 1, no padding: the zero-padded and circular operators coincide."""
    return (all(k == 1 for k in layer.kernel_shape) and not any(layer.pads)
            and all(s == 1 for s in layer.strides))


def preference(layer: Layer, request: Request) -> tuple[list[str], str]:
    """Backend names in order of preference for this layer, and why that order."""
    if not layer.is_conv:
        return ["exact"], "matrix: SVD of the weight"
    if request.boundary == "circular":
        return ["fft-circulant", "exact"], "circular: exact per frequency"
    if request.top_k is not None:
        return ["exact"], f"top-{request.top_k}: matrix-free, exact"
    if _padding_free_pointwise(layer):
        return ["fft-circulant", "exact"], "1x1, no padding: circular is exact"
    try:
        flops = dense_svd_flops(layer, request)
    except SpecprofError:
        return ["exact", "toeplitz"], ""
    if flops <= DENSE_FLOP_BUDGET:
        return ["exact", "toeplitz"], "small: dense SVD"
    # Too slow for a default: --backend exact forces it, --top-k K gives exact top values.
    return ["toeplitz", "exact"], "large: approximation, certified bounds"


def select_backend(layer: Layer, request: Request,
                   backends: dict[str, Any]) -> tuple[str, str] | None:
    """(name, reason) of the first preferred backend that supports ``layer``, else None."""
    order, why = preference(layer, request)
    for name in order:
        backend = backends.get(name)
        if backend is None:
            continue
        support = backend.supports(layer, request)
        if support:
            return name, why or support.reason or f"{name} supports this layer"
    return None


@hookimpl
def specprof_select_backend(layer: Layer, request: Request,
                            backends: dict[str, Any]) -> tuple[str, str] | None:
    return select_backend(layer, request, backends)
