"""Cost estimates of the ``exact`` backend's two paths, which ``Backend.cost`` reports.

Seconds at ``NOMINAL_FLOPS``: only the comparison between backends matters, so the numbers come
from flop counts of the dominant kernels with one nominal rate, corrected where a kernel runs
at a very different speed (measured on one core against the other backends' own estimates:
``benchmarks/backends.py`` and the cost tests).
"""

from __future__ import annotations

from specprof.engine.base import NOMINAL_FLOPS
from specprof.engine.operator import apply_pair_flops, conv_geometry, group_blocks, operator_shape
from specprof.engine.types import Boundary, Layer

LAPACK_SPEED = 3.0
"""How much faster than ``NOMINAL_FLOPS`` LAPACK's blocked dense SVD runs (measured ~3.2x)."""
ARPACK_PAIRS = 400
"""Products with A and A^T that ARPACK's ``svds`` takes for the top values at ``tol=0``: 250 to
1,050 measured on conv layers, whose top values cluster."""
ARPACK_FLOPS_PER_ENTRY = 500.0
"""ARPACK's own work per product pair, per entry of the vector (reorthogonalization, restarts)."""


def svd_flops(rows: int, cols: int) -> float:
    """Flops of a values-only SVD of a dense rows x cols matrix (~4 m n^2, m >= n)."""
    return 4.0 * max(rows, cols) * min(rows, cols) ** 2


def dense_svd_seconds(layer: Layer, boundary: Boundary) -> float:
    """Seconds for the dense SVD of ``layer``'s operator (every group block)."""
    if not layer.is_conv:
        rows, cols = layer.weight.shape
        return svd_flops(int(rows), int(cols)) / (LAPACK_SPEED * NOMINAL_FLOPS)
    blocks = group_blocks(layer)
    rows, cols = operator_shape(blocks[0], boundary)
    return len(blocks) * svd_flops(rows, cols) / (LAPACK_SPEED * NOMINAL_FLOPS)


def matrix_free_top_k_seconds(layer: Layer, boundary: Boundary, k: int) -> float:
    """Seconds for the top ``k`` values by ARPACK on products with A and A^T."""
    if layer.is_conv:
        pair = apply_pair_flops(conv_geometry(layer, boundary))
        size = operator_shape(layer, boundary)[1]
    else:
        rows, size = (int(n) for n in layer.weight.shape)
        pair = 4.0 * rows * size
    products = ARPACK_PAIRS + 40 * k
    return products * (pair + ARPACK_FLOPS_PER_ENTRY * size) / NOMINAL_FLOPS


def zero_padded_top_k_seconds(layer: Layer, k: int) -> float:
    """Seconds for the top ``k`` values of a zero-padded conv by ``top_singular_values``."""
    from specprof.engine.zero_padded import top_singular_values_flops

    return top_singular_values_flops(conv_geometry(layer), k) / NOMINAL_FLOPS
