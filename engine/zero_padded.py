"""The largest singular values of a zero-padded convolution, certified, at model scale.

Shared by the ``exact`` backend (``--top-k K``) and ``toeplitz`` (its bounds on sigma_max).
The pieces:

- ``certified_upper_bound``: the circulant on the embedding grid (m >= n + padding reach)
  contains A as a row/column restriction, so its norm (``circulant_norm``, certified per
  frequency) bounds ||A||_2 from above; the frequency theta* and the symbol's top right
  singular vector v* where it peaks come with it.
- ``start_vector``: the plane wave theta* carrying v*, restricted to the input grid and
  shaped by a half sine per dimension (the top eigenvector of a Toeplitz matrix whose symbol
  peaks at theta* looks like that), plus a little of a fixed random vector so that no group
  or mode is left out of the Krylov space.
- ``top_singular_values``: Lanczos (ARPACK ``eigsh``) on A^T A from that start, with products
  from ``fast_conv_apply`` (torch's float32 convolutions when torch is installed), then a
  check of every Ritz pair with float64 products (``ConvApply``): the residual gives a
  certified distance to a singular value of A, and where it is above the tolerance the pair
  is refined with float64 products.
- 1x1 kernels (any stride, zero padding): A = W (x) S with S a selection of input positions
  with orthonormal rows, so the singular values are W's, each repeated once per output
  position that reads a real input: exact from one small SVD (``pointwise_spectrum``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from specprof.engine.circulant import circulant_norm
from specprof.engine.operator import (
    ConvApply,
    ConvGeometry,
    embedding_grid,
    fast_conv_apply,
    one_torch_thread,
)
from specprof.engine.parallel import one_blas_thread

ROUNDING_MARGIN = 1e-11
"""Relative margin on the upper bound for the rounding of the top symbol's norm (its Gram's
largest eigenvalue: LAPACK's backward error ~ r eps / 2 relative on the norm, far below this);
every other symbol is proven below it by ``circulant_norm``'s Cholesky certificates."""
RESIDUAL_MARGIN = 1e-10
"""Relative margin for the rounding of the float64 products in a residual check: a product's
error is ~ K eps ||A||^2 (K = c_in taps <= ~1e5 terms per entry), below 1e-10 ||A||^2."""
LOWER_MARGIN = 1e-12
"""Relative margin under ||A x|| / ||x|| (float64) for it to be a certified lower bound."""
START_NOISE = 1e-2
NCV = 24
"""Lanczos vectors ARPACK keeps between restarts (at least 2k + 1)."""
"""Weight of the fixed random vector mixed into the start (relative to the plane wave)."""
_CHUNK_ENTRIES = 4_000_000
"""Symbol matrices are built in chunks of about this many complex entries (memory cap)."""

# --------------------------------------------------------------------------- the symbol


def polyphase_kernel(geom: ConvGeometry) -> np.ndarray:
    """(groups, c_out/g, c_in/g * prod(s), q_1..q_d): the stride-1 kernel of the polyphase form.

    y[p] = sum_a W[a] x[s p + dil a]: the tap offset t = dil a reads phase t mod s at the
    shifted phase position p + t // s, so the strided map is a stride-1 correlation with
    c_in * prod(s) input channels (Senderovich et al. 2022)."""
    w = geom.grouped_weight()
    g, co, ci = w.shape[:3]
    q = tuple((dl * (k - 1)) // s + 1
              for dl, k, s in zip(geom.dilations, geom.kernel, geom.strides, strict=True))
    out = np.zeros((g, co, ci, *geom.strides, *q))
    for tap in itertools.product(*(range(k) for k in geom.kernel)):
        offsets = [dl * a for dl, a in zip(geom.dilations, tap, strict=True)]
        phase = tuple(t % s for t, s in zip(offsets, geom.strides, strict=True))
        shift = tuple(t // s for t, s in zip(offsets, geom.strides, strict=True))
        where: tuple[Any, ...] = (slice(None), slice(None), slice(None), *phase, *shift)
        which: tuple[Any, ...] = (Ellipsis, *tap)
        out[where] += w[which]
    return out.reshape(g, co, ci * math.prod(geom.strides), *q)


def symbol_chunks(kernel: np.ndarray, thetas: list[np.ndarray]
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first frequency index, symbol matrices (g, F, c_out/g, c_in/g * S)) over the
    product grid of ``thetas`` (one array of angles per dimension), in memory-bounded chunks
    of ``kernel`` (a ``polyphase_kernel``)."""
    g, co, cis = kernel.shape[:3]
    q = kernel.shape[3:]
    phases = [np.exp(-1j * np.outer(th, np.arange(qq))) for th, qq in zip(thetas, q, strict=True)]
    # Contract the last spatial dimensions fully, loop over the leading frequency index.
    inner = kernel
    for axis in range(len(q) - 1, 0, -1):
        inner = np.tensordot(inner, phases[axis], axes=([3 + axis], [1]))
        inner = np.moveaxis(inner, -1, 3 + axis)
    rest = math.prod(len(th) for th in thetas[1:])
    inner = inner.reshape(g, co, cis, q[0], rest)
    per_freq = max(1, g * co * cis)
    step = max(1, _CHUNK_ENTRIES // (per_freq * max(rest, 1)))
    first = phases[0]
    for start in range(0, first.shape[0], step):
        block = np.einsum("fu,gcxur->gfrcx", first[start:start + step], inner, optimize=True)
        freqs = block.shape[1] * block.shape[2]
        yield start, block.reshape(g, freqs, co, cis)


def dft_grid(m: int) -> np.ndarray:
    """The angles 2 pi j / m, j = 0..m-1."""
    return 2.0 * np.pi * np.arange(m) / m


def circulant_form(geom: ConvGeometry, grid: tuple[int, ...]) -> tuple[Any, ...]:
    """``circulant_norm``'s arguments (kernels, grid, strides, dilations) for the strided
    circular conv on the grid s * ``grid`` (``grid`` in polyphase units)."""
    full = tuple(m * s for m, s in zip(grid, geom.strides, strict=True))
    return geom.grouped_weight(), full, geom.strides, geom.dilations


def top_of_grid(geom: ConvGeometry, grid: tuple[int, ...]) -> tuple[float, np.ndarray, np.ndarray]:
    """(max symbol norm, its frequency, its top right singular vector) on a DFT grid.

    The norm is the certified sigma_max of the circular conv on that grid (``circulant_norm``:
    every frequency's symbol is proven below it, or decomposed), with the frequency that
    attains it on the half grid; the vector, (groups, c_in/g * S) complex and zero outside
    the group that attains it, comes from ``polyphase_kernel``'s symbol there."""
    best, g, f = circulant_norm(*circulant_form(geom, grid))
    index = np.unravel_index(f, (*grid[:-1], grid[-1] // 2 + 1))
    thetas = [dft_grid(m) for m in grid]
    theta = np.array([th[i] for th, i in zip(thetas, index, strict=True)])
    single = [th[i:i + 1] for th, i in zip(thetas, index, strict=True)]
    kernel = polyphase_kernel(geom)
    block = next(symbol_chunks(kernel[g:g + 1], single))[1]
    _, _, vh = np.linalg.svd(block[0, 0])
    vector = np.zeros((geom.groups, vh.shape[1]), dtype=complex)
    vector[g] = vh[0].conj()
    return best, theta, vector


def certified_upper_bound(geom: ConvGeometry, tries: int = 2
                          ) -> tuple[float, tuple[float, ...], np.ndarray]:
    """A proven upper bound of ||A||_2 for the zero-padded convolution A.

    Proof. Per dimension let L = min(pad_begin, dil (k-1)), R = min(pad_end, dil (k-1)) and m a
    multiple of s with m >= n + L + R. Embed x (zero outside [0, n)) into Z_m and let C be the
    circular correlation (Cx)[q] = sum_a W[a] x[(q + dil a) mod m]. An output row p of A with at
    least one real input reads positions i = s p - pad_begin + dil a, all inside [-L, n-1+R]
    (a window that touches [0, n) cannot reach further than dil (k-1) beyond it, nor beyond
    the pads); that interval has at most m points, so i -> i mod m is injective on it and maps
    the non-real positions into [n, m), where the embedded x is 0. Hence row p of A equals row
    q = (s p - pad_begin) mod m of C restricted to the embedded columns; rows of A without a
    real input are zero. All those q are = -pad_begin (mod s) because s | m, i.e. A is, up to
    zero rows, a restriction of rows and columns of S C (S: keep every s-th output starting at
    -pad_begin), so ||A|| <= ||S C||. A circular shift of the input (an isometry) turns S C into
    the strided circular convolution on Z_m, which the polyphase decomposition makes a
    stride-1 block-circulant map on Z_{m/s}: its norm is exactly max over the DFT grid of
    ||P_poly(theta)||_2. Every such m gives a valid bound; we take the smallest of ``tries``
    consecutive valid m, and add ``ROUNDING_MARGIN``. Groups are block diagonal (norm = max
    over groups). Returns (bound, theta*, v*): the frequency and top right singular vector
    where the best grid attained it (see ``top_of_grid``).
    """
    best = None
    for extra in range(tries):
        top, theta, vector = top_of_grid(geom, embedding_grid(geom, extra))
        if best is None or top < best[0]:
            best = (top, tuple(theta), vector)
    assert best is not None
    return best[0] * (1.0 + ROUNDING_MARGIN), best[1], best[2]


# --------------------------------------------------------------------------- start vector


def plane_wave(geom: ConvGeometry, theta: tuple[float, ...], vector: np.ndarray) -> np.ndarray:
    """Re of the plane wave theta carrying the polyphase vector ``vector`` (groups, c_in/g * S),
    on the input grid: x[c, s u + r] = Re v[c, r] exp(-i theta u), shape (c_in, n...)."""
    s, d = geom.strides, geom.d
    units = [-(-n // st) for n, st in zip(geom.n, s, strict=True)]
    wave = vector.reshape(geom.c_in, *s)
    for th, u in zip(theta, units, strict=True):
        wave = np.multiply.outer(wave, np.exp(-1j * th * np.arange(u)))
    order = [0] + [x for j in range(d) for x in (1 + d + j, 1 + j)]
    full = tuple(u * st for u, st in zip(units, s, strict=True))
    wave = np.transpose(wave, order).reshape(geom.c_in, *full)
    return np.ascontiguousarray(wave[(slice(None), *(slice(0, n) for n in geom.n))].real)


def start_vector(geom: ConvGeometry, theta: tuple[float, ...], vector: np.ndarray) -> np.ndarray:
    """The Lanczos start for A^T A (flat, c_in * prod(n)): ``plane_wave`` times a half sine
    sin(pi (i + 1) / (n + 1)) per dimension, plus ``START_NOISE`` of a fixed random vector."""
    x = plane_wave(geom, theta, vector)
    for axis, n in enumerate(geom.n):
        shape = [1] * (geom.d + 1)
        shape[axis + 1] = n
        x = x * np.sin(np.pi * (np.arange(n) + 1) / (n + 1)).reshape(shape)
    x = x.ravel()
    noise = np.random.default_rng(0).standard_normal(x.size)
    norm = float(np.linalg.norm(x))
    if norm == 0.0:
        return noise
    return x / norm + START_NOISE * noise / float(np.linalg.norm(noise))


# --------------------------------------------------------------------------- 1x1 kernels


def pointwise_spectrum(geom: ConvGeometry) -> tuple[np.ndarray, np.ndarray] | None:
    """(values, multiplicities) of all nonzero-block singular values of a zero-padded 1x1
    convolution (None if the kernel is not 1x1): each group's W singular values, repeated
    once per output position whose single tap reads a real input."""
    if any(k != 1 for k in geom.kernel):
        return None
    positions = 1
    for n, o, s, pb in zip(geom.n, geom.out, geom.strides, geom.pad_begin, strict=True):
        index = s * np.arange(o) - pb
        positions *= int(((index >= 0) & (index < n)).sum())
    w = geom.grouped_weight().reshape(geom.groups, geom.c_out // geom.groups, -1)
    values = np.linalg.svd(w, compute_uv=False).ravel()
    if positions == 0:
        values = np.zeros(1)
        positions = 1
    return np.sort(values)[::-1], np.full(values.size, positions, dtype=np.int64)


# --------------------------------------------------------------------------- top values


@dataclass(frozen=True)
class TopSingularValues:
    """The k largest singular values of a zero-padded convolution A, with what is proven.

    - ``values[i]`` = ||A x_i|| for a unit vector x_i (float64 products): a Rayleigh quotient
      of A^T A, so ``values[0]`` <= sigma_max(A) (up to ``LOWER_MARGIN``);
    - ``errors[i]``: a certified bound on |values[i] - sigma| / values[i] for some singular
      value sigma of A (from the residual of x_i, see ``top_singular_values``);
    - ``lower_bound`` <= sigma_max(A) <= ``upper_bound``, both certified.
    That values[i] is the i-th largest singular value and not another one within the bracket
    is Lanczos's answer, proven only where the bracket itself is below the tolerance
    (``bracket_closed``); the Krylov space from a start aligned with the top of the symbol
    makes a miss very unlikely, as for any Lanczos/ARPACK top-k.
    """

    values: np.ndarray
    errors: np.ndarray
    lower_bound: float
    upper_bound: float
    products: int
    multiplicities: np.ndarray | None = None

    @property
    def bracket_closed(self) -> bool:
        return self.upper_bound - self.lower_bound <= 1e-6 * self.upper_bound


class _Counted:
    """A matvec/rmatvec pair that counts its products."""

    def __init__(self, apply: Any) -> None:
        self.apply = apply
        self.products = 0

    def gram(self, x: np.ndarray) -> np.ndarray:
        self.products += 2
        return self.apply.rmatvec(self.apply.matvec(np.ravel(x)))

    def gram_t(self, y: np.ndarray) -> np.ndarray:
        self.products += 2
        return self.apply.matvec(self.apply.rmatvec(np.ravel(y)))


def _lanczos(counted: _Counted, side: int, gram: Any, k: int, v0: np.ndarray,
             tol: float) -> np.ndarray:
    """Ritz vectors (side, k) of the k largest eigenvalues of a Gram operator, by ARPACK."""
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    operator = LinearOperator((side, side), matvec=gram, dtype=np.float64)
    ncv = min(side - 1, max(2 * k + 1, NCV))
    try:
        _, vectors = eigsh(operator, k=k, which="LA", v0=v0, ncv=ncv, tol=tol,
                           maxiter=max(300, 30 * k))
    except ArpackNoConvergence as stopped:  # keep what converged; the check says how well
        vectors = stopped.eigenvectors
    return np.asarray(vectors)


def _check(exact: ConvApply, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, relative errors, unit vectors) of input-side vectors, with float64 products.

    For unit x, theta = ||A x||^2 and r = A^T A x - theta x, some eigenvalue lambda of A^T A
    has |lambda - theta| <= ||r||, hence some singular value sigma = sqrt(lambda) has
    |sigma - sqrt(theta)| <= ||r|| / sqrt(theta): relative error ||r|| / theta."""
    values, errors, units = [], [], []
    for x in vectors.T:
        x = x / float(np.linalg.norm(x))
        y = exact.matvec(x)
        theta = float(y @ y)
        if theta == 0.0:
            values.append(0.0)
            errors.append(math.inf)
        else:
            residual = exact.rmatvec(y) - theta * x
            values.append(math.sqrt(theta))
            errors.append(float(np.linalg.norm(residual)) / theta + RESIDUAL_MARGIN)
        units.append(x)
    order = np.argsort(values)[::-1]
    return (np.asarray(values)[order], np.asarray(errors)[order],
            np.asarray(units).T[:, order])


def top_singular_values(geom: ConvGeometry, k: int = 1, tol: float = 1e-6,
                        upper_tries: int = 1, refine: bool = True) -> TopSingularValues:
    """The k largest singular values of the zero-padded convolution ``geom`` (its conv side;
    a ConvTranspose has the same values), each certified within ``tol`` (relative) of a
    singular value of A where ``errors`` says so, with a certified bracket on sigma_max.

    Stopping rule: not the bracket (the circulant bound can stay above the true norm), but the
    residual. ARPACK runs on A^T A (on A A^T when A has fewer rows) with fast products
    (float32 torch convolutions where available) from ``start_vector``; each Ritz vector is
    then checked with float64 products (``_check``). Pairs whose certified error is above
    ``tol`` are refined by a second ARPACK run with float64 products started from them,
    whose answer is checked the same way (``refine=False`` skips that: for a bracket only);
    ``errors`` reports what the last check proved (callers decide what to do with a value
    left above ``tol``).
    """
    geom = replace(geom, transposed=False)
    pointwise = pointwise_spectrum(geom)
    if pointwise is not None:
        values, multiplicities = pointwise
        top = float(values[0])
        expanded = np.repeat(values[:k], np.minimum(multiplicities[:k], k))[:k]
        return TopSingularValues(values=expanded, errors=np.zeros(expanded.size),
                                 lower_bound=top * (1 - LOWER_MARGIN),
                                 upper_bound=top * (1 + ROUNDING_MARGIN), products=0)
    rows, cols = geom.shape
    upper, theta, vector = certified_upper_bound(geom, upper_tries)
    exact = ConvApply(geom)
    counted = _Counted(fast_conv_apply(geom))
    wanted = min(k, min(rows, cols) - 2)
    start = start_vector(geom, theta, vector)
    with one_blas_thread(), one_torch_thread():
        if cols <= rows:
            vectors = _lanczos(counted, cols, counted.gram, wanted, start, tol / 3)
        else:
            u = _lanczos(counted, rows, counted.gram_t, wanted, counted.apply.matvec(start),
                         tol / 3)
            vectors = np.stack([counted.apply.rmatvec(col) for col in u.T], axis=1)
        values, errors, units = _check(exact, vectors)
        if refine and (values.size < wanted or np.max(errors) > tol):
            slow = _Counted(exact)
            v0 = units[:, 0] if units.size else start
            more = _lanczos(slow, cols, slow.gram, wanted, v0, tol / 16)
            counted.products += slow.products
            values, errors, units = _check(exact, more)
    lower = float(values[0]) * (1 - LOWER_MARGIN)
    return TopSingularValues(values=values[:k], errors=errors[:k], lower_bound=lower,
                             upper_bound=max(upper, lower), products=counted.products)


# --------------------------------------------------------------------------- cost


LANCZOS_PAIRS = 120
"""Product pairs (A, A^T) the Lanczos run takes for the top value, typically, at a residual of
1e-6 from ``start_vector`` (measured 85-180 on ResNet 3x3 layers; fewer at looser tolerances)."""
LANCZOS_FLOPS_PER_ENTRY = 300.0
"""ARPACK's own work per product pair and vector entry (orthogonalization against ~24 vectors)."""


def top_singular_values_flops(geom: ConvGeometry, k: int = 1, lanczos_pairs: int = LANCZOS_PAIRS,
                              upper_tries: int = 1) -> float:
    """Nominal flops of ``top_singular_values``: the circulant norm on the embedding grid, the
    Lanczos products (``fast_pair_flops``) and ARPACK's vector work, and one float64 check
    (``apply_pair_flops``) per value; a 1x1 kernel costs one small SVD."""
    from specprof.engine.circulant import circulant_norm_flops
    from specprof.engine.operator import apply_pair_flops, fast_pair_flops

    geom = replace(geom, transposed=False)
    if all(size == 1 for size in geom.kernel):
        rows, cols = geom.c_out // geom.groups, geom.c_in // geom.groups
        return 4.0 * geom.groups * max(rows, cols) * min(rows, cols) ** 2
    flops = 0.0
    for extra in range(upper_tries):
        kernels, grid, strides, dilations = circulant_form(geom, embedding_grid(geom, extra))
        flops += circulant_norm_flops(kernels.shape, grid, strides, dilations)
    pairs = lanczos_pairs + 20 * (k - 1)
    flops += pairs * (fast_pair_flops(geom) + LANCZOS_FLOPS_PER_ENTRY * min(geom.shape))
    return flops + k * apply_pair_flops(geom)
