"""``toeplitz``: the zero-padded convolution's singular values from its matrix symbol (Yi 2020),
with a certified upper bound and a certified lower bound on its spectral norm.

With zero padding a convolution is block multilevel Toeplitz and, as the input grows, its
singular values are distributed like those of the matrix symbol P(theta) (Szego/Tilli). This
backend samples the (polyphase) symbol on a grid, resamples the sorted samples to the operator's
exact number of singular values and rescales them so that their sum of squares equals the
operator's exact squared Frobenius norm (closed form). The grid is a parameter (``alpha``, see
``ToeplitzBackend``); ``benchmarks/toeplitz_zoo.py`` measures the candidates against the dense
zero-padded spectrum and the default is the best measured.

Everything here is NumPy (SciPy's ARPACK and root finder, imported where used): the circulant
mathematics comes from ``specprof.engine.circulant`` (the ``fft-circulant`` backend's), and the
true zero-padded operator (for the lower bound) is ``specprof.engine.operator``'s
``ConvGeometry`` applied by ``ConvApply``, the matrix-free code the ``exact`` backend uses.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import replace
from typing import Any

import numpy as np

from specprof.engine import hookimpl
from specprof.engine.base import NOMINAL_FLOPS, Backend
from specprof.engine.circulant import (
    circulant_norm,
    circulant_norm_flops,
    circulant_spectrum,
    circulant_spectrum_flops,
)
from specprof.engine.errors import InputShapeError
from specprof.engine.operator import (
    ConvApply,
    ConvGeometry,
    apply_pair_flops,
    conv_geometry,
    embedding_grid,
)
from specprof.engine.parallel import one_blas_thread
from specprof.engine.types import Layer, Request, Spectrum, Support

# Relative margin added to the computed upper bound to cover floating-point rounding of the
# top symbol's norm (from its Gram's largest eigenvalue: LAPACK's backward error ~ r eps ||P||^2,
# ~ r eps / 2 relative on the norm, far below this); every other symbol is proven below it by
# the circulant top-k search's Cholesky certificates, which carry their own rounding bounds.
ROUNDING_MARGIN = 1e-11
# Consecutive embedding grids ``certified_upper_bound`` tries (the smallest bound is kept).
UPPER_BOUND_TRIES = 2
# For ``cost``: pairs of products (A, A^T) that ARPACK takes for the lower bound's top singular
# vector at tol=1e-3, typically (measured 34-194 on layers of 8-512 channels), and its own
# nominal flops per pair and vector entry (reorthogonalization against ~20 Lanczos vectors).
LOWER_BOUND_LANCZOS_PAIRS = 100
ARPACK_FLOPS_PER_ENTRY = 500
# Nominal flops per singular value of resampling the sorted samples and fitting the power law
# (a sort, then up to ~50 root-finding steps, each a power of all values), for ``cost``.
FIT_FLOPS_PER_VALUE = 5000
# Symbol matrices are processed in chunks of about this many complex entries (memory cap).
_CHUNK_ENTRIES = 4_000_000

# --------------------------------------------------------------------------- true operator


def true_operator(geom: ConvGeometry) -> ConvApply:
    """The zero-padded convolution ``geom`` (its conv side, also for a ConvTranspose) as
    specprof's matrix-free operator (the same code as the ``exact`` backend's top-k):
    ``matvec`` is A, ``rmatvec`` its adjoint, on flat vectors."""
    return ConvApply(replace(geom, transposed=False))


def conv_apply(geom: ConvGeometry, x: np.ndarray) -> np.ndarray:
    """y = A x for the zero-padded convolution; x (c_in, n...) -> y (c_out, out...)."""
    return true_operator(geom).matvec(x.ravel()).reshape(geom.c_out, *geom.out)


def conv_adjoint(geom: ConvGeometry, y: np.ndarray) -> np.ndarray:
    """x = A^T y for the zero-padded convolution; y (c_out, out...) -> x (c_in, n...)."""
    return true_operator(geom).rmatvec(y.ravel()).reshape(geom.c_in, *geom.n)


def zero_padded_frobenius_sq(geom: ConvGeometry) -> float:
    """||A||_F^2 in closed form: each tap's squared weights times the number of output
    positions at which that tap reads a real (unpadded) input."""
    counts = []
    for n, o, s, dl, k, pb in zip(geom.n, geom.out, geom.strides, geom.dilations, geom.kernel,
                                  geom.pad_begin, strict=True):
        positions = s * np.arange(o)[:, None] + dl * np.arange(k)[None, :] - pb
        counts.append(((positions >= 0) & (positions < n)).sum(axis=0))
    count = counts[0]
    for c in counts[1:]:
        count = np.multiply.outer(count, c)
    tap_energy = (geom.weight**2).sum(axis=(0, 1))
    return float((tap_energy * count).sum())


# --------------------------------------------------------------------------- the symbol


def _polyphase_kernel(geom: ConvGeometry) -> np.ndarray:
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


def _symbol_chunks(kernel: np.ndarray, thetas: list[np.ndarray]):
    """Yield (frequency indices, symbol matrices (g, F, c_out/g, c_in/g * S)) over the product
    grid of ``thetas`` (one array of angles per dimension), in memory-bounded chunks."""
    g, co, cis = kernel.shape[:3]
    q = kernel.shape[3:]
    phases = [np.exp(-1j * np.outer(th, np.arange(qq))) for th, qq in zip(thetas, q, strict=True)]
    # Contract the last spatial dimension fully, loop over the leading frequency index.
    inner = kernel
    for axis in range(len(q) - 1, 0, -1):
        inner = np.tensordot(inner, phases[axis], axes=([3 + axis], [1]))
        inner = np.moveaxis(inner, -1, 3 + axis)
    # inner: (g, co, cis, q_1, F_2, ..., F_d)
    rest = math.prod(len(th) for th in thetas[1:])
    inner = inner.reshape(g, co, cis, q[0], rest)
    per_freq = max(1, g * co * cis)
    step = max(1, _CHUNK_ENTRIES // (per_freq * max(rest, 1)))
    first = phases[0]
    for start in range(0, first.shape[0], step):
        block = np.einsum("fu,gcxur->gfrcx", first[start:start + step], inner, optimize=True)
        freqs = block.shape[1] * block.shape[2]
        yield start, block.reshape(g, freqs, co, cis)


def _grid(m: int, shift: float = 0.0) -> np.ndarray:
    return 2.0 * np.pi * (np.arange(m) + shift) / m


def _circulant_form(geom: ConvGeometry, grid: tuple[int, ...]) -> tuple[Any, ...]:
    """The circulant functions' arguments (kernels, grid, strides, dilations) for the strided
    circular conv on the grid s * ``grid``."""
    full = tuple(m * s for m, s in zip(grid, geom.strides, strict=True))
    return geom.grouped_weight(), full, geom.strides, geom.dilations


def _circulant_shape(geom: ConvGeometry, grid: tuple[int, ...]) -> tuple[Any, ...]:
    """``_circulant_form`` with the kernels' shape in place of the kernels (for costs)."""
    kernels, full, strides, dilations = _circulant_form(geom, grid)
    return kernels.shape, full, strides, dilations


def symbol_singular_values(geom: ConvGeometry, grid: tuple[int, ...]) -> np.ndarray:
    """All singular values of the polyphase symbol sampled on the DFT grid ``grid`` (sizes per
    dimension, in polyphase units): the exact spectrum of the strided circular convolution on
    the grid s * grid, from ``circulant_spectrum`` (half grid, threads, Gram eigenvalues where
    they are accurate), expanded."""
    values, multiplicities = circulant_spectrum(*_circulant_form(geom, grid))
    return np.repeat(values, multiplicities)


# --------------------------------------------------------------------------- bounds


def _top_of_grid(geom: ConvGeometry, grid: tuple[int, ...]) -> tuple[float, np.ndarray, np.ndarray]:
    """(max symbol norm, its frequency, its top right singular vector) on a DFT grid.

    The norm is the certified sigma_max of the circular conv on that grid (``circulant_norm``:
    every frequency's symbol is proven below it, or decomposed), with the frequency that
    attains it on the half grid; the vector comes from this module's own symbol there."""
    kernel = _polyphase_kernel(geom)
    best, g, f = circulant_norm(*_circulant_form(geom, grid))
    index = np.unravel_index(f, (*grid[:-1], grid[-1] // 2 + 1))
    thetas = [_grid(m) for m in grid]
    theta = np.array([th[i] for th, i in zip(thetas, index, strict=True)])
    single = [th[i:i + 1] for th, i in zip(thetas, index, strict=True)]
    block = next(_symbol_chunks(kernel[g:g + 1], single))[1]
    _, _, vh = np.linalg.svd(block[0, 0])
    # Right singular vector of P(theta*) in group g, zero in the other groups.
    vector = np.zeros((geom.groups, vh.shape[1]), dtype=complex)
    vector[g] = vh[0].conj()
    return best, theta, vector


def certified_upper_bound(geom: ConvGeometry, tries: int = UPPER_BOUND_TRIES
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
    ||P_poly(theta)||_2, computed here by per-frequency SVD. Every such m gives a valid bound;
    we take the smallest of ``tries`` consecutive valid m, and add ``ROUNDING_MARGIN``.
    Groups are block diagonal (norm = max over groups). Returns (bound, theta*, v*): the
    frequency and top right singular vector where the best grid attained it.
    """
    best = None
    for extra in range(tries):
        top, theta, vector = _top_of_grid(geom, embedding_grid(geom, extra))
        if best is None or top < best[0]:
            best = (top, tuple(theta), vector)
    assert best is not None
    return best[0] * (1.0 + ROUNDING_MARGIN), best[1], best[2]


def certified_lower_bound(geom: ConvGeometry, theta: tuple[float, ...], vector: np.ndarray,
                          iterations: int = 10) -> float:
    """max ||A x|| / ||x|| over explicit test vectors x: a lower bound of ||A||_2 by definition,
    since ||A x|| is computed with the true zero-padded operator (``conv_apply``).

    The start is the plane wave theta* modulated by the symbol's top right singular vector
    (the eigenvector of the infinite Toeplitz operator at its peak), restricted to the n-grid;
    a few power iterations with A^T A, then Lanczos (``scipy.sparse.linalg.svds``) started from
    there, refine it; the best ratio over all explicit vectors tried is returned."""
    s, d = geom.strides, geom.d
    units = [-(-n // st) for n, st in zip(geom.n, s, strict=True)]
    # Polyphase layout: x[c, s u + r] = v[c, r] exp(-i theta u), built as (c, s..., u...).
    wave = vector.reshape(geom.c_in, *s)
    for th, u in zip(theta, units, strict=True):
        wave = np.multiply.outer(wave, np.exp(-1j * th * np.arange(u)))
    order = [0] + [x for j in range(d) for x in (1 + d + j, 1 + j)]
    wave = np.transpose(wave, order).reshape(geom.c_in, *(u * st for u, st in zip(units, s, strict=True)))
    x = np.ascontiguousarray(wave[(slice(None), *(slice(0, n) for n in geom.n))].real)
    if not np.any(x):
        x = np.random.default_rng(0).standard_normal((geom.c_in, *geom.n))
    operator = true_operator(geom)
    x = x.ravel()
    best = 0.0
    for _ in range(iterations + 1):  # power iterations: cheap, monotone from a good start
        norm_x = float(np.linalg.norm(x))
        if norm_x == 0.0:
            break
        y = operator.matvec(x)
        best = max(best, float(np.linalg.norm(y)) / norm_x)
        x = operator.rmatvec(y)
        x /= max(float(np.linalg.norm(x)), np.finfo(float).tiny)
    return max(best, _lanczos_lower_bound(geom, operator, x))


def _lanczos_lower_bound(geom: ConvGeometry, operator: ConvApply, start: np.ndarray) -> float:
    """||A v|| / ||v|| for ARPACK's top right singular vector v (Lanczos converges where the
    power iteration is slow); 0 when the operator is too small for ARPACK or it fails."""
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, svds

    rows, cols = geom.shape
    if min(rows, cols) < 3:
        return 0.0
    linear = LinearOperator((rows, cols), dtype=np.float64, matvec=operator.matvec,
                            rmatvec=operator.rmatvec)
    # ARPACK iterates on the smaller side's Gram matrix, so v0 lives there. A loose tol: the
    # bound is ||A v|| / ||v|| for whatever v comes back, valid at any tol, and against
    # tol=1e-8 it moved by 1e-11 (relative) on a 64->64 layer at 56x56, in 2.6x less time.
    v0 = start if cols <= rows else operator.matvec(start)
    try:
        _, _, vt = svds(linear, k=1, tol=1e-3, v0=v0 if np.any(v0) else None, maxiter=200,
                        random_state=0)
    except (ArpackNoConvergence, ArpackError):  # the power-iteration result still stands
        return 0.0
    v = vt[0]
    return float(np.linalg.norm(operator.matvec(v))) / float(np.linalg.norm(v))


# --------------------------------------------------------------------------- approximation


def resample_sorted(values: np.ndarray, count: int) -> np.ndarray:
    """``count`` values with the same distribution as ``values`` (quantile interpolation):
    value i is read at relative position (i + 1/2) / count of the descending samples."""
    v = np.sort(values)[::-1]
    if v.size == count:
        return v
    position = (np.arange(count) + 0.5) * v.size / count - 0.5
    return np.interp(np.clip(position, 0, v.size - 1), np.arange(v.size), v)


ADJUSTMENTS = ("none", "frobenius", "anchored")


def _anchored_power(values: np.ndarray, top: float, frobenius_sq: float) -> np.ndarray:
    """top * (v / v_max)^gamma with gamma chosen so that the sum of squares is ``frobenius_sq``.

    The shape of the symbol's distribution is kept (monotone map), its largest value moves to
    ``top`` and the energy lost to the zero padding is taken mostly from the smaller values:
    the measured error of a uniform Frobenius rescale is an underestimated sigma_max and an
    overestimated bulk."""
    from scipy.optimize import brentq

    ratio = values / values[0]
    target = frobenius_sq / top**2

    def excess(gamma: float) -> float:
        return float(np.sum(ratio ** (2 * gamma))) - target

    low, high = 1e-3, 64.0
    if excess(low) <= 0:  # even a flat spectrum has too little energy: keep the shape
        gamma = low
    elif excess(high) >= 0:
        gamma = high
    else:
        gamma = float(brentq(excess, low, high, xtol=1e-10))
    return top * ratio**gamma


def sampling_grid(geom: ConvGeometry, alpha: float) -> tuple[int, ...]:
    """The DFT grid (polyphase units) ``approximate_singular_values`` samples the symbol on:
    G_0 + alpha (G_1 - G_0) per dimension, rounded, between the plain circular grid
    G_0 = ceil(n / s) and the embedding grid G_1 (``embedding_grid``)."""
    g0 = [-(-n // s) for n, s in zip(geom.n, geom.strides, strict=True)]
    g1 = embedding_grid(geom)
    return tuple(max(1, round(a + alpha * (b - a))) for a, b in zip(g0, g1, strict=True))


def approximate_singular_values(geom: ConvGeometry, alpha: float = 0.5,
                                adjust: str = "anchored", top: float | None = None) -> np.ndarray:
    """All min(rows, cols) singular values of the zero-padded convolution, approximately.

    The polyphase symbol is sampled on the DFT grid of size G = G_0 + alpha (G_1 - G_0) per
    dimension (rounded), where G_0 = ceil(n / s) is the plain circular grid and G_1 the
    embedding grid of ``certified_upper_bound`` (n + k - 1 for 'same' padding). With
    alpha = 1 the samples are the spectrum of a circulant of which A is a row/column
    restriction, so by interlacing sigma_{i+r}(C) <= sigma_i(A) <= sigma_i(C) (r = rows and
    columns removed) and the quantile resampling to the right count lands inside that bracket.
    ``adjust`` then corrects the values with exact information about A:
    - ``frobenius``: one factor so that the sum of squares equals the exact ||A||_F^2;
    - ``anchored``: the largest value becomes ``top`` (an estimate of sigma_max from the true
      operator, e.g. the power-iteration lower bound) and the others follow a power law fitted
      so that the sum of squares equals ||A||_F^2 (``_anchored_power``).
    """
    if adjust not in ADJUSTMENTS:
        raise ValueError(f"adjust must be one of {ADJUSTMENTS}")
    values = resample_sorted(symbol_singular_values(geom, sampling_grid(geom, alpha)),
                             geom.n_values)
    if adjust == "none" or values[0] <= 0:
        return values
    frobenius_sq = zero_padded_frobenius_sq(geom)
    if adjust == "anchored" and top is not None and top > 0:
        return _anchored_power(values, top, frobenius_sq)
    return values * math.sqrt(frobenius_sq / float(np.sum(values**2)))


# --------------------------------------------------------------------------- the backend


class ToeplitzBackend(Backend):
    """Approximate singular values of the zero-padded convolution plus certified norm bounds.

    ``alpha`` places the symbol's sampling grid between the plain circular grid (0) and the
    circulant-embedding grid of size n + k - 1 (1); ``adjust`` corrects the samples with exact
    facts about the zero-padded operator (see ``approximate_singular_values``).
    Defaults are the best measured by ``benchmarks/toeplitz_zoo.py``.
    """

    name = "toeplitz"
    kind = "operator"
    exact = False
    description = "Toeplitz spectral density of the zero-padded conv (Yi 2020) + certified bounds"

    def __init__(self, alpha: float = 0.5, adjust: str = "anchored",
                 power_iterations: int = 10) -> None:
        if adjust not in ADJUSTMENTS:
            raise ValueError(f"adjust must be one of {ADJUSTMENTS}")
        self.alpha = alpha
        self.adjust = adjust
        self.power_iterations = power_iterations

    def supports(self, layer: Layer, request: Request) -> Support:
        if not layer.is_conv:
            return Support.no(f"{layer.op_type} is not a convolution; use exact or fft-circulant")
        if request.boundary != "zeros":
            return Support.no("toeplitz models zero padding; use fft-circulant for circular")
        if layer.input_shape is None:
            return Support.no("input size unknown: pass --input-shape")
        if len(layer.input_shape) != layer.spatial_dims + 1:
            return Support.no(f"input shape {layer.input_shape} does not match a "
                              f"{layer.spatial_dims}d convolution")
        if layer.input_shape[0] != layer.in_channels:
            return Support.no(f"input has {layer.input_shape[0]} channels, "
                              f"the layer expects {layer.in_channels}")
        if not np.all(np.isfinite(layer.weight)):
            return Support.no("weights contain NaN or Inf")
        if any(p < 0 for p in layer.pads):
            return Support.no("negative pads (cropping) are not supported")
        try:
            geom = conv_geometry(layer)
        except InputShapeError as error:
            return Support.no("the convolution has an empty input or output on this input size "
                              f"({error.message})")
        if geom.transposed and layer.output_shape is not None:
            if tuple(layer.output_shape[1:]) != geom.n:
                return Support.no("ConvTranspose output_shape disagrees with its pads and "
                                  "output_padding")
        strides = zip(layer.output_padding, layer.strides, strict=True)
        if geom.transposed and any(op >= s for op, s in strides):
            return Support.no("output_padding must be smaller than the stride")
        return Support.yes()

    def cost(self, layer: Layer, request: Request) -> float | None:
        """What ``compute`` does, in flops at ``NOMINAL_FLOPS``: a certified top-1 of the
        circular conv on each embedding grid tried (upper bound), power and Lanczos products
        with the true operator (lower bound), the full circular spectrum on the sampling grid
        and the fit of all values (approximation)."""
        geom = conv_geometry(layer)
        flops = sum(circulant_norm_flops(*_circulant_shape(geom, embedding_grid(geom, extra)))
                    for extra in range(UPPER_BOUND_TRIES))
        pairs = self.power_iterations + 1 + LOWER_BOUND_LANCZOS_PAIRS
        flops += pairs * (apply_pair_flops(geom) + ARPACK_FLOPS_PER_ENTRY * geom.n_values)
        flops += circulant_spectrum_flops(*_circulant_shape(geom, sampling_grid(geom,
                                                                                self.alpha)))
        flops += FIT_FLOPS_PER_VALUE * geom.n_values
        return flops / NOMINAL_FLOPS

    def compute(self, layer: Layer, request: Request) -> Spectrum:
        start = time.perf_counter()
        geom = conv_geometry(layer)
        with one_blas_thread():  # see specprof.engine.parallel; pieces run in worker threads
            upper, theta, vector = certified_upper_bound(geom)
            lower = certified_lower_bound(geom, theta, vector, self.power_iterations)
            values = approximate_singular_values(geom, self.alpha, self.adjust, top=lower)
        complete = request.top_k is None or request.top_k >= values.size
        if request.top_k is not None:
            values = values[: request.top_k]
        params = {**request.params(), "alpha": self.alpha, "adjust": self.adjust}
        return Spectrum(values=values, kind="operator", backend=self.name, exact=False,
                        boundary="zeros", upper_bound=upper, lower_bound=lower,
                        seconds=time.perf_counter() - start, device="cpu", params=params,
                        note="approximate values; certified bounds on sigma_max",
                        complete=complete)


@hookimpl
def specprof_register_backends() -> list[type[Backend]]:
    return [ToeplitzBackend]
