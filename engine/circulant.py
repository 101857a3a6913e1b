"""The circulant mathematics: exact singular values of a circularly padded convolution.

Sedghi, Gupta, Long (ICLR 2019): with circular padding and stride 1, a convolution on an
n_1 x ... x n_d grid is block multi-level circulant, so the Fourier transform block-diagonalizes
it and its singular values are the union over the grid frequencies f of the singular values of
the c_out x c_in symbol

    P(f) = sum_a W[:, :, a] exp(-2 pi i <f, a * dilation> / n).

The ``fft-circulant`` backend computes exactly this; the ``toeplitz`` backend uses it on
embedding grids for its certified bounds and its sampled symbol. What this module adds to the
paper's recipe (each is exact, none is an approximation):

- The symbol is evaluated straight from the small kernel with one small phase matrix per
  dimension (a separable DFT, ``tensordot``), not by an FFT of the kernel padded to the grid.
  The phases use ``(a * dilation * f) mod n`` in integers, so a kernel larger than the grid wraps
  (its taps alias: they add modulo n) and is never cropped, and dilation costs nothing extra.
- Real kernels have P(-f) = conj P(f), which has the same singular values: only the half grid
  along the last axis is computed (like ``rfftn``) and every value there carries multiplicity 2,
  except on the self-conjugate planes f_d = 0 and f_d = n_d / 2.
- Stride s (n divisible by s) by polyphase decomposition (Senderovich et al. 2022): input
  position s*t + r is channel r of a grid n/s, so the layer is a stride-1 problem on the n/s grid
  with prod(s) times the input channels; each tap a lands in phase (a*dil) mod s at offset
  (a*dil) div s. Unequal strides such as (2, 1) need nothing special.
- Groups (and depthwise) are block-diagonal: the per-group symbols are one more batch axis.
- ConvTranspose with weight (c_in, c_out/g, k) is the adjoint of the Conv with that same weight
  on the grid n = m * s (m its input size): same singular values.
- A kernel of size 1 in every dimension has a constant symbol: the spectrum of the (padded)
  weight matrix once, with multiplicity prod(n/s), never expanded. Gemm/MatMul: the matrix.

The per-frequency singular values come, by default (``method="auto"``), from the eigenvalues
of the symbols' Grams on their smaller side: the Grams straight from the kernel as a
trigonometric polynomial (``gram_polynomial``, GEMM speed) and a batched Hermitian
``eigvalsh`` (about half the flops of an SVD), split over a few threads (the gufunc releases
the GIL). Squaring costs accuracy for values far below their frequency's largest, so every
frequency whose smallest value would carry an estimated error above 1e-11 of its largest
(rank-deficient or ill-conditioned symbols) is decomposed by SVD instead, and square symbols
wider than 96, where that is most of them, go to the SVD from the start. ``method="svd"``:
one batched values-only SVD per frequency everywhere (``np.linalg.svd``, or on CUDA
``torch.linalg.svdvals``). ``method="gram"``: the older per-frequency S^H S products with no
check (values below ~1e-8 sigma_max lose their relative accuracy). On torch (CUDA), "auto"
is the SVD.

A few largest values (``circulant_top_k``, ``circulant_norm``) come without the full spectrum:
``TopKSearch`` decomposes only the frequencies that are not proven (by Cholesky certificates
with rounding bounds) to lie below the k-th largest value found. ``circulant_route`` says which
of these paths a layer takes and ``route_flops`` what it costs (for ``Backend.cost``).

Only NumPy is imported here; torch is imported by ``TorchOps`` when it is used.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from specprof.engine.costs import svd_flops
from specprof.engine.dense import gram_value_error
from specprof.engine.parallel import default_threads, in_threads, one_blas_thread
from specprof.engine.types import MATRIX_OPS, Layer

Method = Literal["auto", "svd", "gram"]

# Below this many matrices a batch is not split over threads: thread start-up would dominate.
_MIN_BATCH_PER_THREAD = 8
_PIECES_PER_THREAD = 8


# --------------------------------------------------------------------------------------------
# The circulant problem: per-group kernels, grid, strides, dilations.


def conv_form(layer: Layer) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The convolution whose circular operator has the layer's singular values.

    Returns ``(kernels, grid, strides, dilations)`` with ``kernels`` of shape
    (groups, c_out/groups, c_in/groups, k_1, ..., k_d) and ``grid`` the conv's input size n.
    A ConvTranspose is the adjoint of the Conv with the same weight, whose input grid is the
    transpose's output grid m * s.
    """
    weight = layer.weight
    g = layer.groups
    assert layer.input_shape is not None
    spatial = tuple(int(n) for n in layer.input_shape[1:])
    if layer.op_type == "ConvTranspose":
        grid = tuple(m * s for m, s in zip(spatial, layer.strides, strict=True))
    else:
        grid = spatial
    kernels = weight.reshape(g, weight.shape[0] // g, *weight.shape[1:])
    return kernels, grid, tuple(layer.strides), tuple(layer.dilations)


def phase_matrix(size: int, grid: int, stride: int, dilation: int, half: bool,
                 dtype: Any = np.complex128) -> np.ndarray:
    """Phases of one dimension: shape (kernel size, stride, frequencies).

    Entry [a, r, f] is exp(-2 pi i q f / N) when tap a (at offset t = a*dilation) falls in
    polyphase component r = t mod s at offset q = t div s of the N = n/s grid, else 0. The
    product ``q * f`` is reduced mod N in integers: exact aliasing and accurate phases.
    """
    small = grid // stride
    n_freq = small // 2 + 1 if half else small
    taps = np.arange(size) * dilation
    phase_index, offset = taps % stride, taps // stride
    freqs = np.arange(n_freq)
    angle = (-2.0 * np.pi / small) * ((offset[:, None] * freqs[None, :]) % small)
    matrix = np.zeros((size, stride, n_freq), dtype=np.complex128)
    matrix[np.arange(size), phase_index, :] = np.exp(1j * angle)
    return matrix.astype(dtype)


def frequency_multiplicities(small_grid: tuple[int, ...]) -> np.ndarray:
    """How often each half-grid frequency's singular values occur on the full grid.

    Shape (N_1, ..., N_{d-1}, N_d//2 + 1). A frequency with 0 < f_d < N_d/2 stands for itself
    and its conjugate -f (outside the half grid): 2. On f_d = 0 and f_d = N_d/2 the conjugate
    is on the half grid too, so those count once.
    """
    *lead, last = small_grid
    along_last = np.full(last // 2 + 1, 2, dtype=np.int64)
    along_last[0] = 1
    if last % 2 == 0:
        along_last[-1] = 1
    return np.broadcast_to(along_last, (*lead, last // 2 + 1))


# --------------------------------------------------------------------------------------------
# Array code, written once for NumPy and torch.


class NumpyOps:
    """NumPy/LAPACK on the CPU; batched SVDs split over ``threads`` threads."""

    device = "cpu"

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)

    def asarray(self, array: np.ndarray) -> np.ndarray:
        return array

    def tensordot(self, a: np.ndarray, b: np.ndarray, axes: tuple[list[int], list[int]]) -> np.ndarray:
        return np.tensordot(a, b, axes=axes)

    def permute(self, a: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
        return np.ascontiguousarray(a.transpose(order))

    def _split(self, stack: np.ndarray, fn: Any) -> np.ndarray:
        workers = min(self.threads, stack.shape[0] // _MIN_BATCH_PER_THREAD)
        if workers <= 1:
            return fn(stack)
        # Several pieces per thread, taken as threads come free: with one piece each, one
        # thread often finished long before the other (measured for the 64->64 layer at
        # 56x56 on 2 cores: 0.34 s with 2 pieces, 0.27 s with 16).
        # The same number for every thread: 3 pieces of 28 big matrices on 2 threads would
        # leave one thread with twice the work.
        pieces = workers * max(1, min(_PIECES_PER_THREAD,
                                      stack.shape[0] // (workers * _MIN_BATCH_PER_THREAD)))
        with one_blas_thread():
            return np.concatenate(in_threads(
                [lambda part=part: fn(part) for part in np.array_split(stack, pieces)], workers))

    def svdvals(self, stack: np.ndarray) -> np.ndarray:
        return self._split(stack, lambda part: np.linalg.svd(part, compute_uv=False))

    def gram_eigvals(self, stack: np.ndarray) -> np.ndarray:
        def one(part: np.ndarray) -> np.ndarray:
            if part.shape[-2] <= part.shape[-1]:
                gram = part @ part.conj().swapaxes(-1, -2)
            else:
                gram = part.conj().swapaxes(-1, -2) @ part
            return np.linalg.eigvalsh(gram)[..., ::-1]

        return self._split(stack, one)

    def vector_norms(self, stack: np.ndarray, axis: int) -> np.ndarray:
        return np.sqrt(np.sum(np.abs(stack) ** 2, axis=axis))

    def numpy(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a)


class TorchOps:
    """torch on ``device`` (CUDA, or the CPU to test that both paths agree)."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = device

    def asarray(self, array: np.ndarray) -> Any:
        # A copy: Layer weights are read-only, which torch.from_numpy warns about.
        return self.torch.from_numpy(np.array(array)).to(self.device)

    def tensordot(self, a: Any, b: Any, axes: tuple[list[int], list[int]]) -> Any:
        if not a.is_complex():
            a = a.to(b.dtype)
        return self.torch.tensordot(a, b, dims=axes)

    def permute(self, a: Any, order: tuple[int, ...]) -> Any:
        return a.permute(order).contiguous()

    def svdvals(self, stack: Any) -> Any:
        return self.torch.linalg.svdvals(stack)

    def gram_eigvals(self, stack: Any) -> Any:
        if stack.shape[-2] <= stack.shape[-1]:
            gram = stack @ stack.mH
        else:
            gram = stack.mH @ stack
        return self.torch.flip(self.torch.linalg.eigvalsh(gram), dims=(-1,))

    def vector_norms(self, stack: Any, axis: int) -> Any:
        return self.torch.linalg.vector_norm(stack, dim=axis)

    def numpy(self, a: Any) -> np.ndarray:
        return a.detach().cpu().numpy()


# --------------------------------------------------------------------------------------------
# The spectrum.


def symbol_matrices(kernels: np.ndarray, grid: tuple[int, ...], strides: tuple[int, ...],
                    dilations: tuple[int, ...], precision: str = "float64",
                    ops: Any = None) -> Any:
    """The half-grid symbols, transposed: shape (groups * prod(F), prod(s) * c_in/g, c_out/g).

    ``kernels`` is (groups, c_out/g, c_in/g, k_1, ..., k_d) as from ``conv_form``; F is the
    half grid of the (n/s) grid (full along all axes but the last). Entry f is P(f)^T with its
    rows ordered (polyphase component, input channel): a transpose and a permutation of rows
    leave the singular values unchanged, and this layout is what the product below yields.

    All symbols come from one matrix product: the phase tensor, with rows (frequency, phase)
    and columns the kernel taps, times the flattened kernels with rows (group, c_in, c_out).
    Its result (F, s, g, c_in, c_out) already is the batch for one group (no copy); with groups
    only contiguous (s, c_in, c_out) blocks move. (An earlier layout with s innermost made that
    copy a strided scatter slower than the product.)
    """
    ops = ops or NumpyOps(default_threads())
    real, cplx = (np.float32, np.complex64) if precision == "float32" else (np.float64, np.complex128)
    d = len(grid)
    g, c_out, c_in = kernels.shape[:3]
    phases: np.ndarray = np.ones((), dtype=cplx)
    for j in range(d):  # outer product: axes (k_1, s_1, F_1, k_2, s_2, F_2, ...)
        phases = np.multiply.outer(phases, phase_matrix(
            kernels.shape[3 + j], grid[j], strides[j], dilations[j], half=(j == d - 1),
            dtype=cplx))
    n_freq = math.prod(phases.shape[2::3])
    n_phase = math.prod(strides)
    rows = [*range(2, 3 * d, 3), *range(1, 3 * d, 3), *range(0, 3 * d, 3)]  # (F..., s..., k...)
    phases = np.ascontiguousarray(phases.transpose(rows)).reshape(n_freq * n_phase, -1)
    weights: np.ndarray = np.asarray(kernels, dtype=real).reshape(g, c_out, c_in, -1).transpose(
        0, 2, 1, 3)
    weights = weights.reshape(g * c_in * c_out, -1).astype(cplx)
    x = ops.tensordot(ops.asarray(phases), ops.asarray(weights), axes=([1], [1]))
    if g == 1:
        return x.reshape(n_freq, n_phase * c_in, c_out)
    # (F, s, g, c_in, c_out) -> (g, F, s, c_in, c_out)
    x = ops.permute(x.reshape(n_freq, n_phase, g, c_in, c_out), (2, 0, 1, 3, 4))
    return x.reshape(g * n_freq, n_phase * c_in, c_out)


def _batched_values(stack: Any, method: Method, ops: Any) -> np.ndarray:
    """Descending singular values of each matrix of the stack, (batch, min(rows, cols))."""
    rows, cols = stack.shape[-2:]
    if min(rows, cols) == 1:
        # Depthwise and friends: a row or column vector's only singular value is its norm.
        return ops.numpy(ops.vector_norms(stack, axis=-1 if rows == 1 else -2)).reshape(-1, 1)
    if method == "gram":
        eigenvalues = ops.numpy(ops.gram_eigvals(stack))
        return np.sqrt(np.clip(eigenvalues, 0.0, None))
    return ops.numpy(ops.svdvals(stack))


def _pointwise_spectrum(kernels: np.ndarray, strides: tuple[int, ...], small_grid: tuple[int, ...],
                        method: Method, ops: Any, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """Kernel size 1: the symbol is [W, 0, ..., 0] at every frequency (zero columns for the
    polyphase components no tap reaches), so one SVD per group with multiplicity prod(n/s)."""
    real = np.float32 if precision == "float32" else np.float64
    g, c_out, c_in = kernels.shape[:3]
    matrices = np.asarray(kernels.reshape(g, c_out, c_in), dtype=real)
    values = _batched_values(ops.asarray(matrices), method, ops)
    extra_zeros = min(c_out, c_in * math.prod(strides)) - min(c_out, c_in)
    values = np.concatenate([values, np.zeros((g, extra_zeros), dtype=values.dtype)], axis=1)
    return values.ravel(), np.full(values.size, math.prod(small_grid), dtype=np.int64)


def circulant_spectrum(kernels: np.ndarray, grid: tuple[int, ...], strides: tuple[int, ...],
                       dilations: tuple[int, ...], method: Method = "auto",
                       precision: str = "float64", ops: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """All singular values of the circular conv as (values, multiplicities), unsorted.

    Every grid dimension must be divisible by its stride.
    """
    ops = ops or NumpyOps(default_threads())
    small_grid = tuple(n // s for n, s in zip(grid, strides, strict=True))
    route = circulant_route(kernels.shape, grid, strides, method, precision, None,
                            isinstance(ops, NumpyOps))
    if route == "pointwise":
        return _pointwise_spectrum(kernels, strides, small_grid,
                                   "gram" if method == "gram" else "svd", ops, precision)
    if route == "gram checked":
        values = _gram_spectrum(kernels, grid, strides, dilations, ops,
                                _FLOAT32_TOLERANCE if precision == "float32" else _GRAM_TOLERANCE)
    else:
        stack = symbol_matrices(kernels, grid, strides, dilations, precision, ops)
        values = _batched_values(stack, "gram" if route == "gram" else "svd", ops)
    per_frequency = np.tile(frequency_multiplicities(small_grid).ravel(), kernels.shape[0])
    multiplicities = np.repeat(per_frequency, values.shape[1])
    return values.ravel(), multiplicities


# ``method="auto"`` takes the Grams and ``eigvalsh`` for square-ish symbols up to this order r
# (the smaller side), and for symbols at least twice as long as wide at any r; SVD otherwise.
# Measured on 2 cores, random weights, float64: 64->64 at 56x56 0.23 s against the SVD's
# 0.36 s (3% of frequencies sent back to SVD), 96->96 at 32x32 0.26 against 0.33 s (14%);
# at 128->128 at 28x28 42% went back (0.46 against 0.41 s) and at r = 256 and 512 all of
# them: a random square symbol's smallest value is too small beside its largest for the
# Gram. Long symbols are well conditioned: 256->256 stride 2 at 28x28 (256 x 1024 symbols)
# 0.40 against 2.72 s, 1024->512 at 7x7 1.1 against 2.3 s, none sent back.
_GRAM_FIRST_MAX = 96
# The "auto" Gram path keeps every value within this fraction of its frequency's largest
# (estimated: a tenth of the 1e-10 that ``exact`` must meet); frequencies that can't are
# decomposed by SVD.
_GRAM_TOLERANCE = 1e-11
# The error of a computed Gram eigenvalue is ``specprof.engine.dense.GRAM_ROUNDING`` r u
# lambda_max: LAPACK's backward error for the eigensolver (its "modest function of r" taken
# as r) plus forming the Gram (sums of ~r k products, whose rounding grows like their square
# root in practice); ``gram_value_error`` turns it into an error on sigma.


# What ``precision="float32"`` promises: values within 1e-5 sigma_max. The Gram path in float64
# keeps every value within sqrt(GRAM_ROUNDING r u) sigma_max (2e-6 even at r = 10^4), so it
# never needs the SVD for float32; complex64 LAPACK from NumPy was no faster than complex128
# here (0.31 against 0.25 s for 812 SVDs of order 64), so float32 takes this path at every r.
_FLOAT32_TOLERANCE = 1e-6


def _gram_first(c_out: int, c_in: int, strides: tuple[int, ...], method: Method,
                precision: str, on_numpy: bool) -> bool:
    """Whether ``method="auto"`` takes the Gram path for symbols of c_out x prod(s) c_in: on
    NumPy, for symbols that are matrices (smaller side r > 1); in float64 where
    r <= ``_GRAM_FIRST_MAX`` or the symbol is at least twice as long as wide, in float32
    always."""
    if method != "auto" or not on_numpy:
        return False
    r, long = sorted((c_out, c_in * math.prod(strides)))
    return r > 1 and (precision == "float32" or r <= _GRAM_FIRST_MAX or long >= 2 * r)


def _gram_spectrum(kernels: np.ndarray, grid: tuple[int, ...], strides: tuple[int, ...],
                   dilations: tuple[int, ...], ops: NumpyOps,
                   tolerance: float = _GRAM_TOLERANCE) -> np.ndarray:
    """Singular values (batch, r) of the half-grid symbols (the batch of ``symbol_matrices``),
    descending, from the eigenvalues of their Grams.

    The Grams come from ``gram_polynomial`` (GEMM speed, no symbols formed) and their
    eigenvalues from a batched ``eigvalsh`` in worker threads. A computed eigenvalue carries
    an absolute error Delta of about ``GRAM_ROUNDING`` r u lambda_max, so sigma =
    sqrt(lambda) carries at most min(sqrt(Delta), Delta / (2 sigma)): largest for the
    smallest value. Where that estimate exceeds ``tolerance`` sigma_max for a frequency's
    smallest value (a rank-deficient or ill-conditioned symbol), the frequency is decomposed
    by SVD instead.
    """
    with one_blas_thread():
        poly = gram_polynomial(kernels, grid, strides, dilations, ops.threads)
        n_freq, g = poly.n_freq, kernels.shape[0]
        size = max(1, min(_PIECE_BYTES // (16 * poly.r * poly.r), -(-n_freq // ops.threads)))
        pieces = [(group, np.arange(start, min(start + size, n_freq)))
                  for group in range(g) for start in range(0, n_freq, size)]
        eigenvalues = np.concatenate(in_threads(
            [lambda piece=piece: np.linalg.eigvalsh(poly.evaluate(*piece))[:, ::-1]
             for piece in pieces], ops.threads))
    values = np.sqrt(np.clip(eigenvalues, 0.0, None))
    error = gram_value_error(eigenvalues[:, 0], values[:, -1], poly.r)
    redo = np.flatnonzero(error > tolerance * values[:, 0])
    if redo.size:
        values[redo] = ops.svdvals(symbols_at(kernels, grid, strides, dilations, redo))
    return values


# --------------------------------------------------------------------------------------------
# Top-k without the full spectrum, certified.

_UNIT_ROUNDOFF = 2.0**-53  # float64
_LANCZOS_STEPS = 6


def _tap_layout(kernel_shape: tuple[int, ...], strides: tuple[int, ...],
                dilations: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Polyphase component (flat index) and offset (per dimension) of every kernel tap.

    Taps in C order, as ``kernels.reshape(..., -1)`` flattens them; the same rule as
    ``phase_matrix``: tap offset t = a * dilation lands in component t mod s at offset t div s.
    """
    taps = np.indices(kernel_shape).reshape(len(kernel_shape), -1).T * np.array(dilations)
    component = np.ravel_multi_index(tuple((taps % np.array(strides)).T), strides)
    return component, taps // np.array(strides)


@dataclass(frozen=True)
class GramPolynomial:
    """The Grams of all half-grid symbols as a matrix trigonometric polynomial in f.

    C_{-delta} = C_delta^T and the phase of -delta is the conjugate of that of delta, so
    G(f) = C_0 + sum_{delta > 0} cos_delta (C_delta + C_delta^T)
               + i sin_delta (C_delta - C_delta^T):
    ``real`` (groups, deltas // 2 + 1, r*r) holds the symmetric combinations (C_0 last),
    ``imag`` (groups, deltas // 2, r*r) the antisymmetric ones, ``cos``/``sin``
    (frequencies, same) the real and imaginary parts of the phases of the deltas > 0 (in C
    order of the delta box, its first half; then delta 0 for ``cos``). Half the products of
    summing over all deltas. ``errors[g]`` bounds ||computed - exact||_2 of every Gram of
    group g as ``evaluate`` computes it; ``inner`` is the longest floating-point sum involved.
    """

    real: np.ndarray
    imag: np.ndarray
    cos: np.ndarray
    sin: np.ndarray
    errors: np.ndarray
    inner: int
    r: int

    @property
    def n_freq(self) -> int:
        return self.cos.shape[0]

    def single(self) -> GramPolynomial:
        """The same polynomial in float32 (its Grams complex64, ``errors`` not valid for
        them): for estimates that only order the frequencies, at half the memory traffic."""
        return GramPolynomial(self.real.astype(np.float32), self.imag.astype(np.float32),
                              self.cos.astype(np.float32), self.sin.astype(np.float32),
                              self.errors, self.inner, self.r)

    def evaluate(self, group: int, freqs: np.ndarray | slice) -> np.ndarray:
        """Grams (len(freqs), r, r) complex of one group: two real GEMMs (the coefficients are
        real), each into a contiguous array and then copied into its part (a GEMM writing
        straight into the strided real or imaginary part ran 2x slower). Cheap enough
        (deltas x r^2 per frequency) to redo in cache-sized pieces rather than keep the whole
        stack in memory."""
        cos, sin = self.cos[freqs], self.sin[freqs]
        grams = np.empty((cos.shape[0], self.r * self.r), dtype=np.result_type(cos, 1j))
        grams.real = cos @ self.real[group]
        grams.imag = sin @ self.imag[group] if sin.shape[1] else 0.0  # else a 1-tap reach
        return grams.reshape(-1, self.r, self.r)


def gram_matrices(kernels: np.ndarray, grid: tuple[int, ...], strides: tuple[int, ...],
                  dilations: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, int]:
    """The Gram of every half-grid symbol on its smaller side, all at once.

    Returns ``(grams, errors, inner)``: grams (groups * prod(F), r, r) complex, Hermitian,
    each with the eigenvalues of S_f^H S_f for the symbol S_f of ``symbol_matrices`` (same
    batch order), up to conjugation; ``errors[g]`` bounds ||computed - exact||_2 for every
    frequency of group g; ``inner`` is the longest floating-point sum involved.
    """
    poly = gram_polynomial(kernels, grid, strides, dilations)
    grams = np.concatenate([poly.evaluate(group, slice(None))
                            for group in range(poly.real.shape[0])])
    return grams, poly.errors, poly.inner


def gram_polynomial(kernels: np.ndarray, grid: tuple[int, ...], strides: tuple[int, ...],
                    dilations: tuple[int, ...], threads: int = 1) -> GramPolynomial:
    """The Grams of the half-grid symbols on their smaller side (r x r), from the kernel alone.

    Why not S_f^H S_f per frequency: the Gram is a trigonometric polynomial in f of small
    degree, G(f) = sum_delta C_delta exp(-2 pi i <f, delta> / N), with real coefficients
    C_delta = sum of W_a W_b^T over tap pairs (a, b) in the same polyphase component whose
    offsets differ by delta (P P^H side; the P^H P side places W_a^T W_b at block (phase a,
    phase b)). The coefficients cost one real GEMM per delta (over all its pairs at once;
    independent of the grid), and Grams then come from real products (frequencies x deltas) @ (deltas x
    r^2), done by ``GramPolynomial.evaluate`` in pieces as they are needed: for a
    64->64 3x3 layer at 56x56, 1624 frequencies share 25 coefficient matrices; for a strided
    512->512 layer it avoids ~60 GFLOP of per-frequency products of 2048-wide symbols.

    Error bound: every entry of C_delta and of the sum over delta is a floating-point sum of
    at most ``inner`` products whose absolute values add up to at most the entry of
    T = sum_phase A_r A_r^T (A_r = sum of |W_a| over the taps of component r; A^T A for the
    other side), so |computed - exact| <= gamma_inner T elementwise (Higham, Accuracy and
    Stability, section 3.1; the complex phases double gamma), and
    ||T||_2 <= sum_r ||A_r||_F^2.
    """
    g, c_out, c_in = kernels.shape[:3]
    kernel_shape = tuple(kernels.shape[3:])
    n_taps = math.prod(kernel_shape)
    n_phase = math.prod(strides)
    small = tuple(n // s for n, s in zip(grid, strides, strict=True))
    component, offset = _tap_layout(kernel_shape, strides, dilations)
    reach = offset.max(axis=0) + 1  # offsets 0 .. reach-1 per dimension
    deltas = tuple(int(2 * q - 1) for q in reach)
    left = c_out <= n_phase * c_in  # P P^H (c_out x c_out), else P^H P (n_phase c_in square)
    r = c_out if left else n_phase * c_in
    weights = np.ascontiguousarray(
        np.asarray(kernels, dtype=np.float64).reshape(g, c_out, c_in, n_taps).transpose(0, 3, 1, 2))
    # C_delta for the first half of the delta box (C order) and delta = 0: the rest are
    # their transposes. Ordered tap pairs (x, y) whose offsets differ by delta; P P^H pairs
    # only taps of one polyphase component.
    n_delta = math.prod(deltas)
    half = n_delta // 2
    difference = offset[:, None, :] - offset[None, :, :] + reach - 1
    pair_delta = np.ravel_multi_index(tuple(np.moveaxis(difference, -1, 0)), deltas)
    if left:
        pair_delta[component[:, None] != component[None, :]] = -1
    coefficients = np.zeros((g, half + 1, r, r))
    by_tap = np.ascontiguousarray(weights.transpose(0, 2, 1, 3)) if left else weights

    def one_delta(j: int) -> None:
        xs, ys = np.nonzero(pair_delta == j)
        if left:
            # One GEMM per delta over all its pairs: [W_x1 W_x2 ...] @ [W_y1 W_y2 ...]^T
            # (GEMM speed; a GEMM and an add per pair cost 2.5x more at 512 channels).
            stacked_x = by_tap[:, :, xs].reshape(g, c_out, -1)
            stacked_y = by_tap[:, :, ys].reshape(g, c_out, -1)
            np.matmul(stacked_x, stacked_y.swapaxes(-1, -2), out=coefficients[:, j])
            return
        # P^H P: W_x^T W_y lands in block (component x, component y).
        for cx, cy in set(zip(component[xs].tolist(), component[ys].tolist(), strict=True)):
            mine = (component[xs] == cx) & (component[ys] == cy)
            stacked_x = weights[:, xs[mine]].reshape(g, -1, c_in)
            stacked_y = weights[:, ys[mine]].reshape(g, -1, c_in)
            coefficients[:, j, cx * c_in:(cx + 1) * c_in, cy * c_in:(cy + 1) * c_in] = (
                stacked_x.swapaxes(-1, -2) @ stacked_y)

    # The deltas with most pairs first, taken by threads as they come free.
    work = np.bincount(pair_delta[pair_delta >= 0], minlength=n_delta)[:half + 1]
    in_threads([lambda j=j: one_delta(int(j)) for j in np.argsort(-work, kind="stable")],
                threads if r >= 64 else 1)
    # Phases (deltas, frequencies): exp(-2 pi i ((delta f) mod N) / N), integers reduced first.
    phases = np.ones((1, 1), dtype=np.complex128)
    for j, (n, q) in enumerate(zip(small, reach, strict=True)):
        freqs = np.arange(n // 2 + 1 if j == len(small) - 1 else n)
        delta = np.arange(-(q - 1), q)
        one = np.exp((-2j * np.pi / n) * ((delta[:, None] * freqs[None, :]) % n))
        phases = np.einsum("ab,cd->acbd", phases, one).reshape(
            phases.shape[0] * one.shape[0], -1)
    bound = np.zeros(g)
    for c in range(n_phase):  # ||A_c||_F^2, A_c the sum of |W_a| over the taps of component c
        bound += np.sum(np.abs(weights[:, component == c]).sum(axis=1) ** 2, axis=(1, 2))
    # Per entry: one dot product over the pairs of a delta (at most n_taps of them, c_in or
    # c_out terms each), then a sum over the deltas; +64 covers the complex phases (each a few
    # ulps); +2: C_delta +- C_delta^T is one more addition (and one spare).
    inner = n_taps * (c_in if left else c_out) + n_delta + 64 + 2
    gamma = 2 * inner * _UNIT_ROUNDOFF / (1 - 2 * inner * _UNIT_ROUNDOFF)
    errors = 2 * gamma * bound  # x2: the norms themselves are computed in floating point
    # G(f) = C_0 + sum_{delta in the first half} cos (C_delta + C_delta^T)
    #        + i sin (C_delta - C_delta^T), with C_{-delta} = C_delta^T.
    positive = coefficients[:, :half]
    real = np.concatenate([positive + positive.swapaxes(-1, -2), coefficients[:, half:]], axis=1)
    imag = positive - positive.swapaxes(-1, -2)
    return GramPolynomial(real.reshape(g, half + 1, r * r), imag.reshape(g, half, r * r),
                          np.ascontiguousarray(phases.real.T[:, :half + 1]),
                          np.ascontiguousarray(phases.imag.T[:, :half]), errors, inner, r)


def symbols_at(kernels: np.ndarray, grid: tuple[int, ...], strides: tuple[int, ...],
               dilations: tuple[int, ...], indices: np.ndarray) -> np.ndarray:
    """``symbol_matrices(...)[indices]`` (float64) without computing the other frequencies."""
    d = len(grid)
    g, c_out, c_in = kernels.shape[:3]
    phases: np.ndarray = np.ones((), dtype=np.complex128)
    for j in range(d):
        phases = np.multiply.outer(phases, phase_matrix(
            kernels.shape[3 + j], grid[j], strides[j], dilations[j], half=(j == d - 1)))
    n_freq = math.prod(phases.shape[2::3])
    n_phase = math.prod(strides)
    rows = [*range(2, 3 * d, 3), *range(1, 3 * d, 3), *range(0, 3 * d, 3)]
    phases = phases.transpose(rows).reshape(n_freq, n_phase, -1)
    weights: np.ndarray = np.asarray(kernels, dtype=np.float64).reshape(g, c_out, c_in, -1)
    weights = weights.transpose(0, 3, 2, 1).reshape(g, -1, c_in * c_out)  # (g, taps, c_in c_out)
    group, freq = np.divmod(np.asarray(indices), n_freq)
    out = np.empty((len(group), n_phase * c_in, c_out), dtype=np.complex128)
    for gi in np.unique(group):
        mine = np.flatnonzero(group == gi)
        x = phases[freq[mine]].reshape(-1, phases.shape[2]) @ weights[gi]
        out[mine] = x.reshape(len(mine), n_phase * c_in, c_out)
    return out


def _lanczos_lower_bounds(grams: np.ndarray, steps: int = _LANCZOS_STEPS) -> np.ndarray:
    """Largest Ritz values of a few batched Lanczos steps: estimates of lambda_max(G_f) from
    below, used only to order the frequencies (nothing relies on how close they are).

    Lanczos rather than power steps: after m matrix-vector products its estimate converges
    like a Chebyshev polynomial of degree m, so a handful of memory-bound passes over the
    Grams order them about as well as 30 power steps did. Full reorthogonalization (cheap:
    m vectors per frequency) keeps the Ritz values meaningful.
    """
    count, r = grams.shape[:2]
    steps = min(steps, r)
    start = np.random.default_rng(0).standard_normal(r) + 1j  # deterministic, generic
    # In the Grams' precision (complex64 from ``GramPolynomial.single``: only an order).
    q = np.broadcast_to(start / np.linalg.norm(start), (count, r)).astype(grams.dtype)
    basis = np.empty((steps, count, r), dtype=grams.dtype)
    alpha = np.zeros((count, steps))
    beta = np.zeros((count, steps))
    tiny = np.finfo(grams.real.dtype).tiny
    m = 0
    for m in range(steps):
        basis[m] = q
        # Batched matrix-vector products: einsum is faster for small matrices, matmul
        # (one BLAS gemv each) for large ones (measured at r = 64 and r >= 128).
        w = np.einsum("fij,fj->fi", grams, q) if r <= 64 else (grams @ q[..., None])[..., 0]
        alpha[:, m] = np.real(np.einsum("fi,fi->f", q.conj(), w))
        coeffs = np.einsum("mfi,fi->mf", basis[:m + 1].conj(), w)
        w -= np.einsum("mf,mfi->fi", coeffs, basis[:m + 1])
        norm = np.linalg.norm(w, axis=1)
        if m + 1 == steps:
            break
        beta[:, m] = norm
        q = (w / np.maximum(norm, tiny)[:, None]).astype(grams.dtype, copy=False)
    size = m + 1
    tri = np.zeros((count, size, size))
    idx = np.arange(size)
    tri[:, idx, idx] = alpha[:, :size]
    tri[:, idx[:-1], idx[1:]] = beta[:, :size - 1]
    tri[:, idx[1:], idx[:-1]] = beta[:, :size - 1]
    return np.linalg.eigvalsh(tri)[:, -1]


def certified_below(gram: np.ndarray, bound: float, inner: int,
                     gram_error: float | None = None) -> bool:
    """True only if every eigenvalue of the exact Gram S^H S is <= ``bound``.

    ``gram`` is the computed (Hermitian) Gram of a symbol S whose
    products had ``inner`` terms; ``gram_error``, where given, bounds ||computed - exact||_2
    (as from ``gram_matrices``), else the bound of (1) is used.
    Proof sketch, with u the unit roundoff and r the order:
    (1) forming the Gram in floating point (Higham, Accuracy and Stability, Lemma 3.5 and
        section 3.6 for complex data) gives G~ = G + E1 with |E1| <= gamma |S|^H |S|
        elementwise, so ||E1||_2 <= ||E1||_F <= gamma ||S||_F^2, gamma = 2(inner+2)u/(1-...),
        and ||S||_F^2 = trace(G~) up to the same relative error;
    (2) a Cholesky factorization of M = mu I - G~ that completes in floating point satisfies
        R^H R = M + E2 with |E2| <= gamma_{r+1} |R^H||R| (Higham Thm 10.3), so
        ||E2||_2 <= gamma_{r+1} ||R||_F^2 = gamma_{r+1} trace(M + E2) <= 2 gamma_{r+1} r mu;
        forming M adds at most u (mu + max diag G~) on the diagonal;
    (3) R^H R is positive semidefinite, so lambda_min(M) >= -||E2||, i.e.
        lambda_max(G~) <= mu + ||E2|| + u(...), and by Weyl lambda_max(G) <= that + ||E1||.
    mu is ``bound`` minus all these terms (each doubled), so success proves the claim.
    """
    mu = _shifts(gram[None], bound, inner,
                 None if gram_error is None else np.array([gram_error]))[0]
    if mu <= 0:
        return False
    shifted = -gram
    shifted[np.diag_indices(gram.shape[0])] += mu
    return _positive_definite(shifted)


def _positive_definite(matrices: np.ndarray) -> bool:
    """Whether LAPACK's Cholesky factorization completes for every matrix of the stack.

    NumPy's: it releases the GIL, so worker threads certify in parallel (SciPy's wrapper
    holds it)."""
    try:
        np.linalg.cholesky(matrices)
    except np.linalg.LinAlgError:
        return False
    return True


def _shifts(grams: np.ndarray, bound: float, inner: int,
            gram_errors: np.ndarray | None) -> np.ndarray:
    """mu of ``certified_below`` for each Gram of the stack: ``bound`` minus all rounding
    error terms, each doubled."""
    r = grams.shape[-1]
    trace = np.sum(np.abs(np.diagonal(grams, axis1=-2, axis2=-1)), axis=-1)
    if gram_errors is None:
        gamma_gram = 2 * (inner + 2) * _UNIT_ROUNDOFF
        gram_errors = gamma_gram * trace * (1 + gamma_gram)
    gamma_chol = 2 * (r + 1) * _UNIT_ROUNDOFF
    margin = 2 * (gram_errors + 2 * gamma_chol * r * bound + _UNIT_ROUNDOFF * (bound + trace))
    return bound - margin


def uncertified(grams: np.ndarray, bound: float, inner: int, gram_error: float) -> np.ndarray:
    """Positions in the stack of the Grams NOT certified below ``bound``.

    The same test as ``certified_below`` (same shifts, the same LAPACK Cholesky through
    ``np.linalg.cholesky``), batched: one call factors the whole stack and succeeds only if
    every matrix is positive definite, the common case (one frequency holds the maximum, the
    rest are below it). Where the batch fails, each matrix is tested alone. Matrices larger
    than ``_BATCHED_CHOLESKY_MAX`` are always tested alone: a batch gains nothing there, and a
    failure costs no second pass.
    """
    mu = _shifts(grams, bound, inner, np.full(grams.shape[0], gram_error))
    if grams.shape[-1] <= _BATCHED_CHOLESKY_MAX and (mu > 0).all():
        shifted = -grams
        diagonal = np.arange(grams.shape[-1])
        shifted[:, diagonal, diagonal] += mu[:, None]
        if _positive_definite(shifted):
            return np.zeros(0, dtype=np.int64)
    return np.array([i for i in range(grams.shape[0])
                     if not certified_below(grams[i], bound, inner, gram_error)], dtype=np.int64)


_BATCHED_CHOLESKY_MAX = 256


# Grams are evaluated, screened and certified in pieces of about this many bytes per thread
# (in cache: each pass over a whole stack from memory cost more than evaluating it again).
_PIECE_BYTES = 1 << 22


@dataclass(frozen=True)
class TopK:
    """What a top-k search found: the k largest values with their multiplicities, how many
    half-grid symbols it decomposed, and the batch index (group * half-grid frequencies +
    frequency) of a symbol that holds the largest value."""

    values: np.ndarray
    multiplicities: np.ndarray
    decomposed: int
    top_index: int


class TopKSearch:
    """The certified search for the k largest values of a circular conv (see
    ``circulant_top_k``), over the half-grid symbols of all groups (the "batch").

    State: the Gram polynomial, an estimate ``rho`` of every symbol's largest squared value
    (only ever used to order them), which symbols are ``decomposed`` and the values found
    there, and ``t``, the k-th largest value found so far (0 until k are found). ``t`` only
    grows, so a symbol once certified below it stays below. ``run`` is the whole search;
    each method is one of its steps. Parallel work goes to ``threads`` worker threads; the
    caller runs it on one BLAS thread (``one_blas_thread``).
    """

    # Relative margin above t^2 from which a float32 estimate counts as "certainly above":
    # well above its rounding, so that near-ties are left to the certificate.
    ESTIMATE_MARGIN = 1e-4

    def __init__(self, kernels: np.ndarray, grid: tuple[int, ...], strides: tuple[int, ...],
                 dilations: tuple[int, ...], k: int, threads: int) -> None:
        self.kernels, self.grid, self.strides, self.dilations = kernels, grid, strides, dilations
        self.k = k
        self.threads = max(1, threads)
        self.poly = gram_polynomial(kernels, grid, strides, dilations, self.threads)
        self.n_freq = self.poly.n_freq
        count = kernels.shape[0] * self.n_freq
        small_grid = tuple(n // s for n, s in zip(grid, strides, strict=True))
        self.per_frequency = np.tile(frequency_multiplicities(small_grid).ravel(),
                                     kernels.shape[0])
        self.rho = np.zeros(count)
        self.refined = np.zeros(count, dtype=bool)
        self.decomposed = np.zeros(count, dtype=bool)
        self.found_values: list[np.ndarray] = []
        self.found_multiplicities: list[np.ndarray] = []
        self.found_at: list[int] = []  # the batch index of each found_values entry
        self.t = 0.0
        self.pieces = self._pieces()

    def run(self) -> TopK:
        """Estimate, decompose the most promising, certify the rest, settle the failures."""
        self.estimate()
        self.refine(self.order()[:max(8, self.rho.size // 8)])
        order = self.order()
        # Enough symbols for k values (one per frequency and conjugate: for random weights
        # the k largest are mostly each frequency's largest, not one frequency's next).
        self.decompose(order[:int(np.searchsorted(np.cumsum(self.per_frequency[order]),
                                                  self.k)) + 1])
        self.decompose(np.flatnonzero(
            ~self.decomposed & (self.rho >= self.t**2 * (1 + self.ESTIMATE_MARGIN))))
        failed = self.certify()
        self.refine(failed)  # these hold the maximum: order them well before any SVD
        self.settle(failed)
        return self.result()

    def _pieces(self) -> list[tuple[int, np.ndarray]]:
        """(group, frequencies) pieces that never cross groups: about ``_PIECE_BYTES`` of
        Grams each, at least deltas/4 frequencies (so that reading the coefficients again per
        piece stays small beside the Grams it yields), and at least one piece per thread."""
        poly = self.poly
        size = max(_PIECE_BYTES // (16 * poly.r * poly.r), -(-poly.real.shape[1] // 2))
        size = min(size, -(-self.n_freq // self.threads))
        return [(group, np.arange(start, min(start + size, self.n_freq)))
                for group in range(self.kernels.shape[0])
                for start in range(0, self.n_freq, size)]

    def _each_piece(self, fn: Any) -> list[Any]:
        return in_threads([lambda piece=piece: fn(piece) for piece in self.pieces], self.threads)

    def order(self) -> np.ndarray:
        """Batch indices, largest estimate first."""
        return np.argsort(-self.rho, kind="stable")

    def estimate(self) -> None:
        """A few Lanczos steps on every Gram: ``rho``. In float32 (half the memory traffic;
        an error there costs time, never exactness; checked against float64 on ResNet-50)."""
        rough = self.poly.single()
        self.rho = np.concatenate(self._each_piece(
            lambda piece: _lanczos_lower_bounds(rough.evaluate(*piece), _LANCZOS_STEPS)))

    def refine(self, indices: np.ndarray) -> None:
        """More Lanczos steps (r // 8: a wrong order costs an SVD, r^3, and Cholesky
        failures) on the symbols of ``indices`` not refined yet, in float64 (float32 lost
        the orthogonality of this longer basis: Ritz values 6x lambda_max seen on a
        512-wide stride-2 layer). Split per group over the worker threads, each part
        writing its own entries of ``rho``."""
        indices = indices[~self.refined[indices]]
        steps = min(max(2 * _LANCZOS_STEPS, self.poly.r // 8), 32)

        def estimate(mine: np.ndarray) -> None:
            group = int(mine[0] // self.n_freq)
            self.rho[mine] = _lanczos_lower_bounds(
                self.poly.evaluate(group, mine % self.n_freq), steps)

        groups = indices // self.n_freq
        parts = [part for group in np.unique(groups)
                 for part in np.array_split(indices[groups == group], self.threads) if part.size]
        in_threads([lambda part=part: estimate(part) for part in parts], self.threads)
        self.refined[indices] = True

    def decompose(self, indices: np.ndarray) -> None:
        """The k largest values of the symbols of ``indices`` (only a symbol's k largest can
        be among the operator's k largest: each carries multiplicity >= 1), from the top of
        its Gram's spectrum, SVD where that is not accurate enough (``_top_singular_values``);
        then ``t`` is raised."""
        for f in indices:
            group, freq = divmod(int(f), self.n_freq)
            values = _top_singular_values(
                self.poly.evaluate(group, np.array([freq]))[0], self.k,
                lambda f=f: symbols_at(self.kernels, self.grid, self.strides, self.dilations,
                                       np.array([f]))[0])
            self.found_values.append(values)
            self.found_multiplicities.append(np.full(values.size, self.per_frequency[f]))
            self.found_at.append(int(f))
            self.decomposed[f] = True
        if len(indices):
            values, multiplicities = self._found_top_k()
            self.t = float(values[-1]) if multiplicities.sum() >= self.k else 0.0

    def certify(self) -> np.ndarray:
        """Batch indices of the symbols not decomposed and not certified below ``t``
        (batched Cholesky certificates, ``uncertified``), all pieces in parallel."""

        def piece_failures(piece: tuple[int, np.ndarray]) -> np.ndarray:
            group, freqs = piece
            freqs = freqs[~self.decomposed[group * self.n_freq + freqs]]
            if freqs.size == 0:
                return freqs
            grams = self.poly.evaluate(group, freqs)
            return group * self.n_freq + freqs[uncertified(
                grams, self.t**2, self.poly.inner, float(self.poly.errors[group]))]

        return np.concatenate(self._each_piece(piece_failures))

    def settle(self, failed: np.ndarray) -> None:
        """Each symbol whose certificate failed, most promising first (each decomposition
        raises ``t`` most): certified again at the ``t`` of that moment, else decomposed."""
        order = self.order()
        for f in order[np.isin(order, failed)]:
            group, freq = divmod(int(f), self.n_freq)
            gram = self.poly.evaluate(group, np.array([freq]))[0]
            if not certified_below(gram, self.t**2, self.poly.inner,
                                   float(self.poly.errors[group])):
                self.decompose(np.array([f]))

    def _found_top_k(self) -> tuple[np.ndarray, np.ndarray]:
        return top_k_of(np.concatenate(self.found_values),
                        np.concatenate(self.found_multiplicities), self.k)

    def result(self) -> TopK:
        values, multiplicities = self._found_top_k()
        top = self.found_at[int(np.argmax([found[0] for found in self.found_values]))]
        return TopK(values, multiplicities, int(self.decomposed.sum()), top)


def _search_top_k(kernels: np.ndarray, grid: tuple[int, ...], strides: tuple[int, ...],
                  dilations: tuple[int, ...], k: int, ops: NumpyOps) -> TopK:
    """``TopKSearch`` for symbols that are matrices; vectors (one side 1, e.g. depthwise)
    have their norm as only value: all of them, directly."""
    g, c_out, c_in = kernels.shape[:3]
    if min(c_out, c_in * math.prod(strides)) > 1:
        return TopKSearch(kernels, grid, strides, dilations, k, ops.threads).run()
    small_grid = tuple(n // s for n, s in zip(grid, strides, strict=True))
    per_frequency = np.tile(frequency_multiplicities(small_grid).ravel(), g)
    stack = symbol_matrices(kernels, grid, strides, dilations, "float64", ops)
    values = _batched_values(stack, "svd", ops).ravel()
    return TopK(*top_k_of(values, per_frequency, k), stack.shape[0], int(np.argmax(values)))


def circulant_top_k(kernels: np.ndarray, grid: tuple[int, ...], strides: tuple[int, ...],
                    dilations: tuple[int, ...], k: int,
                    ops: NumpyOps | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """The k largest singular values (counting multiplicities) without the full spectrum.

    Returns (values, multiplicities, how many of the half-grid symbols were decomposed).

    Same values as ``top_k_of(*circulant_spectrum(...), k)`` (float64; where it computes,
    the top of the Gram's spectrum, SVD for values below 1e-2 of their frequency's largest)
    but a frequency is skipped when its symbol is proven to have no value above the k-th
    largest value found so far, t (``TopKSearch``):
    1. the Gram of every symbol on its smaller side, straight from the kernel
       (``gram_polynomial``: a trigonometric polynomial, GEMM speed), and a few batched Lanczos
       steps give estimates rho_f <= sigma_max(f)^2, used only to order the frequencies;
    2. the top k values of the top frequencies (as many as their multiplicities need to reach
       k; ``_top_singular_values``) give
       t; the ones with rho_f >= t^2 cannot be skipped and are computed too, raising t;
    3. every other frequency is skipped only where a Cholesky factorization of t^2 I - G_f,
       shifted by a bound of all rounding errors, succeeds (``certified_below``): then all
       its values are <= t, so the top k are among the values computed. Where it fails, it is
       tried again at the t of that moment (in order of rho) and computed if it fails
       again. t only grows, so earlier certificates stay valid.
    """
    # One BLAS thread per worker thread, everywhere below: BLAS threads on top of the worker
    # threads, or NumPy's and SciPy's two OpenBLAS pools spinning against each other, made
    # the Cholesky certificates 3-5x slower (measured at r = 256 on 2 cores).
    with one_blas_thread():
        found = _search_top_k(kernels, grid, strides, dilations, k,
                              ops or NumpyOps(default_threads()))
    return found.values, found.multiplicities, found.decomposed


def circulant_norm(kernels: np.ndarray, grid: tuple[int, ...], strides: tuple[int, ...],
                   dilations: tuple[int, ...],
                   ops: NumpyOps | None = None) -> tuple[float, int, int]:
    """sigma_max of the circular conv (certified like ``circulant_top_k``), the group and the
    half-grid frequency (flat, C order over (N_1, ..., N_d // 2 + 1), N = grid / strides) of a
    symbol that attains it."""
    ops = ops or NumpyOps(default_threads())
    g, c_out, c_in = kernels.shape[:3]
    n_freq = half_grid_size(grid, strides)
    if all(k == 1 for k in kernels.shape[3:]):  # the same symbol at every frequency
        tops = np.linalg.svd(np.asarray(kernels, dtype=np.float64).reshape(g, c_out, c_in),
                             compute_uv=False)[:, 0]
        return float(tops.max()), int(np.argmax(tops)), 0
    with one_blas_thread():
        found = _search_top_k(kernels, grid, strides, dilations, 1, ops)
    group, freq = divmod(found.top_index, n_freq)
    return float(found.values[0]), group, freq


# A value the Gram gives is used only down to this fraction of its matrix's largest value:
# lambda = sigma^2 carries an absolute error ~ r u lambda_max, so sigma keeps an error below
# ~ r u sigma_max^2 / sigma, under 1e-12 sigma_max here; smaller values come from an SVD.
_GRAM_ACCURATE = 1e-2


def _top_singular_values(gram: np.ndarray, k: int, matrix: Any) -> np.ndarray:
    """The k largest singular values (descending) of a matrix given its Gram on the smaller side.

    The Gram's eigenvalues (``np.linalg.eigvalsh``: one Hermitian tridiagonal reduction, 4/3
    r^3 flops, against a full SVD of the possibly much taller matrix). SciPy's ``eigh`` with
    an index range was 10-15% faster per call at r = 256-1024, but importing ``scipy.linalg``
    for it cost 0.2 s, which the whole certified top-1 of a ResNet-50 did not win back.
    Exact for values >= ``_GRAM_ACCURATE`` * sigma_max; where the k-th is smaller,
    ``matrix()`` (a callable: building it may cost) is decomposed by SVD instead.
    """
    k = min(k, gram.shape[-1])
    eigenvalues = np.linalg.eigvalsh(gram)[::-1][:k]
    values = np.sqrt(np.clip(eigenvalues, 0.0, None))
    if values[-1] >= _GRAM_ACCURATE * values[0]:
        return values
    return np.linalg.svd(matrix(), compute_uv=False)[:k]


def _pointwise_top_k(kernels: np.ndarray, strides: tuple[int, ...], small_grid: tuple[int, ...],
                     k: int, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Kernel size 1, top k: the k largest singular values of each group's weight matrix, from
    its Gram on the smaller side (``_top_singular_values``), multiplicity prod(n/s). The
    polyphase zero columns add only zero values, which never beat these unless the matrix has
    fewer than k values: then zeros fill up (``top_k_of`` trims).

    On one BLAS thread, the Gram's columns split over ``threads`` worker threads: for
    ResNet-50's 36 pointwise layers 0.36-0.45 s, against 0.43-0.56 s with OpenBLAS's own
    threads (still spinning after the product while the eigensolver runs)."""
    g, c_out, c_in = kernels.shape[:3]
    found = []
    with one_blas_thread():
        for matrix in np.asarray(kernels, dtype=np.float64).reshape(g, c_out, c_in):
            tall = matrix if c_out >= c_in else matrix.T
            gram = np.empty((tall.shape[1], tall.shape[1]))

            def columns(part: slice, tall: np.ndarray = tall, gram: np.ndarray = gram) -> None:
                gram[:, part] = tall.T @ tall[:, part]

            edges = np.linspace(0, tall.shape[1], threads + 1).astype(int)
            in_threads([lambda a=a, b=b: columns(slice(a, b))
                         for a, b in itertools.pairwise(edges)],
                        threads if tall.size >= 1 << 16 else 1)
            found.append(_top_singular_values(gram, k, lambda matrix=matrix: matrix))
    values = np.concatenate(found)
    extra = min(k, min(c_out, c_in * math.prod(strides))) - min(k, c_out, c_in)
    values = np.concatenate([values, np.zeros(g * extra)])
    return values, np.full(values.size, math.prod(small_grid), dtype=np.int64)


def half_grid_size(grid: tuple[int, ...] | list[int],
                   strides: tuple[int, ...] | None = None) -> int:
    """Frequencies of a real kernel's symbol that the half grid keeps, on ``grid`` divided by
    ``strides`` (the polyphase grid; ``None``: ``grid`` itself)."""
    strides = strides if strides is not None else (1,) * len(grid)
    *lead, last = (n // s for n, s in zip(grid, strides, strict=True))
    return math.prod(lead) * (last // 2 + 1)


def top_k_of(values: np.ndarray, multiplicities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest values of the whole operator, counting multiplicities (exact)."""
    order = np.argsort(-values, kind="stable")
    values, multiplicities = values[order], multiplicities[order]
    before = np.cumsum(multiplicities) - multiplicities
    keep = before < k
    kept = np.minimum(multiplicities[keep], k - before[keep])
    return values[keep], kept




# --------------------------------------------------------------------------------------------
# One layer: which path it takes, what that yields, what it costs.

Route = Literal["matrix", "matrix top-k", "pointwise top-k", "certified top-k", "pointwise",
                "gram checked", "gram", "svd"]


def circulant_route(kernel_shape: tuple[int, ...], grid: tuple[int, ...],
                    strides: tuple[int, ...], method: Method = "auto", precision: str = "float64",
                    top_k: int | None = None, on_numpy: bool = True) -> Route:
    """How the circular conv with kernels of ``kernel_shape`` (groups, c_out/g, c_in/g, k...)
    on ``grid`` is computed (``on_numpy``: NumPy ops, else torch):

    - ``pointwise top-k``: few values (at most half) of a 1x1 kernel's weight matrix, from
      its Gram (``_pointwise_top_k``; up to 64 groups);
    - ``certified top-k``: few values of a conv whose symbols are matrices (``TopKSearch``;
      float64 whatever the precision: its proof is written for float64);
    - ``pointwise``: a 1x1 kernel's full spectrum, one SVD of the weight per group;
    - ``gram checked``: Gram eigenvalues with an accuracy check (``method="auto"``, see
      ``_gram_first``); ``gram``: per-frequency S^H S, no check; ``svd``: one SVD per
      half-grid frequency.
    The top-k routes are taken on NumPy only.
    """
    g, c_out, c_in = kernel_shape[:3]
    pointwise = all(k == 1 for k in kernel_shape[3:])
    if top_k is not None and on_numpy:
        if pointwise and g <= 64 and 2 * top_k <= min(c_out, c_in):
            return "pointwise top-k"
        if not pointwise and top_k * 8 <= g * min(c_out, c_in) * math.prod(grid):
            return "certified top-k"
    if pointwise:
        return "pointwise"
    if _gram_first(c_out, c_in, strides, method, precision, on_numpy):
        return "gram checked"
    return "gram" if method == "gram" else "svd"


def layer_route(layer: Layer, method: Method = "auto", precision: str = "float64",
                top_k: int | None = None, on_numpy: bool = True) -> Route:
    """``circulant_route`` of a layer; a Gemm/MatMul is a ``matrix`` (one SVD), or with few
    values asked (at most half) on NumPy a ``matrix top-k``: the top of its Gram's spectrum,
    like a 1x1 kernel's (``_pointwise_top_k``; ResNet-50's 2048->1000 fc: 2.5 s of SVD
    became 0.1-0.5 s on the shared 2-core machine)."""
    if layer.op_type in MATRIX_OPS:
        small = min(int(n) for n in layer.weight.shape)
        if top_k is not None and on_numpy and layer.weight.ndim == 2 and 2 * top_k <= small:
            return "matrix top-k"
        return "matrix"
    kernels, grid, strides, _ = conv_form(layer)
    return circulant_route(kernels.shape, grid, strides, method, precision, top_k, on_numpy)


def circulant_value_count(layer: Layer) -> int:
    """How many singular values (with multiplicity) the layer's circular operator has."""
    if layer.op_type in MATRIX_OPS:
        return min(int(n) for n in layer.weight.shape)
    kernels, grid, strides, _ = conv_form(layer)
    g, c_out, c_in = kernels.shape[:3]
    small_grid = (n // s for n, s in zip(grid, strides, strict=True))
    return g * math.prod(small_grid) * min(c_out, c_in * math.prod(strides))


@dataclass(frozen=True)
class CirculantValues:
    """Singular values of a layer's circular operator with their multiplicities (not
    expanded, not sorted), and a note for the user on how they were computed."""

    values: np.ndarray
    multiplicities: np.ndarray
    note: str


def circulant_singular_values(layer: Layer, method: Method = "auto",
                              precision: str = "float64", top_k: int | None = None,
                              ops: Any = None) -> CirculantValues:
    """The singular values of ``layer`` with circular padding (a Gemm/MatMul: its matrix),
    by the route ``layer_route`` names; with ``top_k`` the top-k routes may return more than
    k values (``top_k_of`` trims), never fewer than the k largest."""
    ops = ops or NumpyOps(default_threads())
    route = layer_route(layer, method, precision, top_k, isinstance(ops, NumpyOps))
    if route == "matrix":
        real = np.float32 if precision == "float32" else np.float64
        matrix = ops.asarray(np.asarray(layer.weight, dtype=real)[None])
        values = _batched_values(matrix, "gram" if method == "gram" else "svd", ops).ravel()
        return CirculantValues(values, np.ones(values.size, dtype=np.int64), "matrix")
    if route == "matrix top-k":
        assert top_k is not None
        weight = np.asarray(layer.weight, dtype=np.float64)
        values, multiplicities = _pointwise_top_k(weight.reshape(1, *weight.shape, 1), (1,),
                                                  (1,), top_k, ops.threads)
        return CirculantValues(values, multiplicities,
                               f"top-{top_k} of the matrix (Gram eigenvalues)")
    kernels, grid, strides, dilations = conv_form(layer)
    small_grid = tuple(n // s for n, s in zip(grid, strides, strict=True))
    small = "x".join(map(str, small_grid))
    if route == "pointwise top-k":
        assert top_k is not None
        values, multiplicities = _pointwise_top_k(kernels, strides, small_grid, top_k,
                                                  ops.threads)
        note = (f"top-{top_k} of the weight matrix (1x1 kernel: the same at every frequency "
                f"of {small})")
    elif route == "certified top-k":
        assert top_k is not None
        values, multiplicities, computed = circulant_top_k(kernels, grid, strides, dilations,
                                                           top_k, ops)
        note = (f"certified top-{top_k} on the half grid of {small}: decomposed {computed} of "
                f"{kernels.shape[0] * half_grid_size(grid, strides)} symbols, the rest proven "
                "smaller")
    else:
        values, multiplicities = circulant_spectrum(kernels, grid, strides, dilations, method,
                                                    precision, ops)
        how = {"pointwise": "svd of the weight matrix (1x1 kernel: the same at every "
                            "frequency)",
               "gram checked": "Gram eigenvalues"}.get(route, route)
        note = f"{how} on the half grid of {small}"
    if any(s != 1 for s in strides):
        note += f", polyphase x{math.prod(strides)}"
    return CirculantValues(values, multiplicities, note)


# Costs, for ``Backend.cost``. A "flop" here is nominal: a kernel's single-core time at
# ``NOMINAL_FLOPS``, fitted on the calibration machine (AMD EPYC, one core, NumPy's OpenBLAS)
# as a r^3 + b r^2 + c per matrix. The r^3 terms are close to LAPACK's flop counts (values-only
# SVD ~``svd_flops``, Hermitian eigenvalues 2 r^3, Cholesky r^3 / 2, complex); the r^2 and
# constant terms are LAPACK's small-size inefficiency and NumPy's per-matrix overhead, which
# dominate below r ~ 64 (an SVD of order 16 costs 10x its flops).


def _complex_svd_flops(m: int, n: int) -> float:
    return svd_flops(m, n) + 400.0 * m * n + 2e4


def _real_svd_flops(m: int, n: int) -> float:
    return svd_flops(m, n) + 200.0 * m * n + 1e4


def _hermitian_eigvals_flops(r: int) -> float:
    return 2.0 * r**3 + 400.0 * r**2 + 1.5e4


def _cholesky_flops(r: int) -> float:
    return 0.5 * r**3 + 70.0 * r**2 + 1e3


def _lanczos_flops(r: int, steps: int) -> float:
    """Batched Lanczos steps on one Gram (matrix-vector products, reorthogonalization)."""
    return steps * (13.0 * r * r + 6e3)


# Symbols the certified top-k decomposes beyond k, typically (measured on random and
# ResNet-50 layers: a handful; each costs one Gram eigensolve).
_TOP_K_EXTRA_DECOMPOSED = 4
# Per call on the threaded routes: worker threads, pieces, Python (measured on layers of a few
# channels).
_CALL_FLOPS = 3e7


def route_flops(route: Route, kernel_shape: tuple[int, ...], grid: tuple[int, ...],
                strides: tuple[int, ...], dilations: tuple[int, ...],
                top_k: int | None = None) -> float:
    """Estimated flops (nominal, see above) of ``route`` (see ``circulant_route``) on kernels
    of ``kernel_shape`` (groups, c_out/g, c_in/g, k...) and ``grid``: building the symbols or
    their Grams, then one SVD, Gram eigensolve or Cholesky certificate per half-grid symbol.
    Not for ``matrix``."""
    g, c_out, c_in = kernel_shape[:3]
    kernel = kernel_shape[3:]
    taps = math.prod(kernel)
    n_phase = math.prod(strides)
    r, long = sorted((c_out, c_in * n_phase))
    batch = g * half_grid_size(grid, strides)
    if route == "pointwise":  # no threads, one small SVD per group
        return g * _real_svd_flops(c_out, c_in)
    if route == "pointwise top-k":
        small, big = sorted((c_out, c_in))
        return _CALL_FLOPS + g * (2.0 * big * small**2 + _hermitian_eigvals_flops(small) / 3)
    symbols = 5.0 * batch * n_phase * taps * c_in * c_out
    if r == 1 or route == "svd":
        per_symbol = 10.0 * long if r == 1 else _complex_svd_flops(long, r)
        return _CALL_FLOPS + symbols + batch * per_symbol
    if route == "gram":
        return _CALL_FLOPS + symbols + batch * (8.0 * long * r * r + _hermitian_eigvals_flops(r))
    reach = [(dl * (k - 1)) // s + 1 for k, s, dl in zip(kernel, strides, dilations, strict=True)]
    deltas = math.prod(2 * q - 1 for q in reach)
    # One GEMM per delta (P P^H side), or per delta and pair of polyphase components (P^H P).
    calls = (deltas // 2 + 1) * (1 if c_out <= c_in * n_phase else n_phase**2)
    coefficients = 0.6 * g * taps * taps * c_out * c_in * r / n_phase + 2e5 * calls
    evaluate = 2.5 * deltas * r * r
    if route == "gram checked":
        # Square-ish symbols send some ill-conditioned frequencies back to the SVD.
        redo = 0.1 * _complex_svd_flops(long, r) if long < 2 * r else 0.0
        return (_CALL_FLOPS + coefficients
                + batch * (evaluate + _hermitian_eigvals_flops(r) + redo))
    # certified top-k: a float32 pass of Lanczos steps over every Gram (about half the time
    # of float64), a longer float64 pass over an eighth, a Cholesky certificate for every
    # Gram, and a few eigensolves.
    k = top_k or 1
    steps = min(max(2 * _LANCZOS_STEPS, r // 8), 32)
    rough = 0.5 * (evaluate + _lanczos_flops(r, _LANCZOS_STEPS))
    refined = min(batch, max(8, batch // 8)) * (evaluate + _lanczos_flops(r, steps))
    certify = evaluate + _cholesky_flops(r)
    decomposed = min(batch, k + _TOP_K_EXTRA_DECOMPOSED) * (evaluate + _hermitian_eigvals_flops(r))
    return _CALL_FLOPS + coefficients + batch * (rough + certify) + refined + decomposed


def circulant_flops(layer: Layer, method: Method = "auto", precision: str = "float64",
                    top_k: int | None = None, on_numpy: bool = True) -> float:
    """Estimated flops of ``circulant_singular_values`` on ``layer``."""
    route = layer_route(layer, method, precision, top_k, on_numpy)
    if route == "matrix":
        rows, cols = (int(n) for n in layer.weight.shape)
        return _real_svd_flops(rows, cols)
    if route == "matrix top-k":
        rows, cols = (int(n) for n in layer.weight.shape)
        return route_flops("pointwise top-k", (1, rows, cols, 1), (1,), (1,), (1,), top_k)
    kernels, grid, strides, dilations = conv_form(layer)
    return route_flops(route, kernels.shape, grid, strides, dilations, top_k)


def circulant_spectrum_flops(kernel_shape: tuple[int, ...], grid: tuple[int, ...],
                             strides: tuple[int, ...], dilations: tuple[int, ...],
                             method: Method = "auto", precision: str = "float64") -> float:
    """Estimated flops of ``circulant_spectrum`` (on NumPy)."""
    route = circulant_route(kernel_shape, grid, strides, method, precision)
    return route_flops(route, kernel_shape, grid, strides, dilations)


def circulant_norm_flops(kernel_shape: tuple[int, ...], grid: tuple[int, ...],
                         strides: tuple[int, ...], dilations: tuple[int, ...]) -> float:
    """Estimated flops of ``circulant_norm``."""
    if all(k == 1 for k in kernel_shape[3:]):
        return route_flops("pointwise", kernel_shape, grid, strides, dilations)
    return route_flops("certified top-k", kernel_shape, grid, strides, dilations, 1)
