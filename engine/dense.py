"""All singular values of a weight matrix, in the memory of the matrix and at GEMM speed.

Checkpoint matrices (a transformer's projections, embeddings and heads) come as float32 (or
bf16/f16 widened to float32) and are asked for in ``precision="float32"``: every value within
1e-5 sigma_max. LAPACK's float32 SVD barely keeps that promise (5.5e-6 and 7.9e-6 of
sigma_max measured on random 2048 x 2048 and 5632 x 2048 matrices) and needs a copy of the
matrix plus its workspace. The Gram on the smaller side, accumulated in float64 over slices of
rows, is both tighter and lighter: G = W^T W (n x n, n the smaller side) in float64, its
eigenvalues by LAPACK's divide-and-conquer ``eigvalsh``, sigma = sqrt(lambda). Forming G is one
DGEMM pass over W; no copy of W is made beyond one slice.

Accuracy, checked a posteriori as ``specprof.engine.circulant`` does for its symbols: a
computed eigenvalue carries an absolute error of about ``GRAM_ROUNDING * n * u * lambda_max``
(LAPACK's backward error plus the rounding of the sums forming G), so sigma = sqrt(lambda)
carries at most min(sqrt(Delta), Delta / (2 sigma)), largest for the smallest value. Where
that exceeds the precision's tolerance, the values come from LAPACK's SVD instead.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import numpy as np

from specprof.engine.parallel import one_blas_thread

GRAM_ROUNDING = 4.0
"""Absolute error of a Gram eigenvalue in units of n u lambda_max (see the module doc)."""
GRAM_TOLERANCE = {"float32": 1e-5, "float64": 1e-10}
"""Largest estimated error, as a fraction of sigma_max, the Gram route may leave: what each
precision promises. The estimate is a worst case (it says 9.5e-7 of sigma_max for a random
2048 x 2048 matrix whose Gram values were within 5e-13 of float64's SVD)."""
ONE_THREAD_ORDER = 1024
"""Grams up to this order get their eigenvalues on one BLAS thread (see ``gram_singular_values``)."""
UNIT_ROUNDOFF = 2.0**-53
"""float64's unit roundoff u."""
_SLICE_BYTES = 64 * 2**20


def gram_value_error(largest_eigenvalue: np.ndarray | float, smallest_value: np.ndarray | float,
                     order: int) -> np.ndarray:
    """Estimated largest absolute error of singular values taken as square roots of the
    float64 eigenvalues of Grams of ``order``: Delta = ``GRAM_ROUNDING`` order u lambda_max on
    each eigenvalue, hence min(sqrt(Delta), Delta / (2 sigma)) on sigma, largest for the
    smallest value (0 for a zero Gram). Elementwise over arrays of Grams."""
    delta = GRAM_ROUNDING * order * UNIT_ROUNDOFF * np.clip(largest_eigenvalue, 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):  # sigma = 0: the sqrt(Delta) branch
        error = np.minimum(np.sqrt(delta), delta / (2 * np.asarray(smallest_value, dtype=float)))
    return np.where(delta == 0, 0.0, error)


def gram_singular_values(matrix: np.ndarray) -> tuple[np.ndarray, float]:
    """(singular values descending, estimated largest absolute error) of ``matrix`` from the
    eigenvalues of its float64 Gram on the smaller side. Never copies the whole matrix."""
    tall = matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T
    rows, n = tall.shape
    gram = np.zeros((n, n), dtype=np.float64)
    step = max(1, _SLICE_BYTES // (8 * n))
    for start in range(0, rows, step):
        piece = np.asarray(tall[start:start + step], dtype=np.float64)
        gram += piece.T @ piece
    import scipy.linalg

    # One BLAS thread for orders up to ONE_THREAD_ORDER: the tridiagonal reduction is half
    # matrix-vector work, and a pool of threads on it was 5-40x slower at order 384 (30 ms on
    # one thread) whenever the cores were busy; the DGEMM above keeps every thread.
    limit = one_blas_thread() if n <= ONE_THREAD_ORDER else contextlib.nullcontext()
    with limit:
        eigenvalues = scipy.linalg.eigvalsh(gram, overwrite_a=True, check_finite=False,
                                            driver="evd")[::-1]
    values = np.sqrt(np.clip(eigenvalues, 0.0, None))
    if values.size == 0:
        return values, 0.0
    return values, float(gram_value_error(eigenvalues[0], values[-1], n))


def svd_singular_values(matrix: np.ndarray, precision: Literal["float64", "float32"]
                        ) -> np.ndarray:
    """LAPACK's values-only SVD in ``precision``, descending (one working copy)."""
    import scipy.linalg

    dtype = np.float32 if precision == "float32" else np.float64
    # The transpose of a C-ordered copy is Fortran-ordered: LAPACK works on it in place.
    work = np.array(matrix, dtype=dtype, order="C").T
    return scipy.linalg.svdvals(work, overwrite_a=True, check_finite=False).astype(np.float64)


def matrix_singular_values(matrix: np.ndarray, precision: Literal["float64", "float32"]
                           ) -> tuple[np.ndarray, str]:
    """All singular values of a weight matrix, descending, and how they were computed.

    The float64 Gram of the smaller side, checked against the precision's promise, where it
    can pass: always in ``float32`` (its worst case stays below 1e-5 sigma_max up to n ~ 2e5),
    in ``float64`` only for matrices at least twice as long as wide (a random square matrix's
    smallest values are too small beside its largest for 1e-10). Otherwise, or where the check
    fails, LAPACK's SVD in float64 (more accurate than float32's, which the Gram beats).
    """
    short, long = sorted(matrix.shape)
    if short == 0:
        return np.zeros(0), "empty"
    if short > 1 and (precision == "float32" or long >= 2 * short):
        values, error = gram_singular_values(matrix)
        if error <= GRAM_TOLERANCE[precision] * float(values[0]):
            return values, "float64 Gram of the smaller side"
    return svd_singular_values(matrix, "float64"), "float64 SVD"
