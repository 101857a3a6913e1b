"""``toeplitz``: the zero-padded convolution's singular values from its matrix symbol (Yi 2020),
with a certified upper bound and a certified lower bound on its spectral norm.

With zero padding a convolution is block multilevel Toeplitz and, as the input grows, its
singular values are distributed like those of the matrix symbol P(theta) (Szego/Tilli). This
backend samples the (polyphase) symbol on a grid, resamples the sorted samples to the operator's
exact number of singular values and rescales them so that their sum of squares equals the
operator's exact squared Frobenius norm (closed form). The grid is a parameter (``alpha``, see
``ToeplitzBackend``); ``benchmarks/toeplitz_zoo.py`` measures the candidates against the dense
zero-padded spectrum and the default is the best measured.

The certified bounds on sigma_max come from ``specprof.engine.zero_padded`` (shared with the
``exact`` backend's top-k): the circulant on the embedding grid above, a short Lanczos run on the
true operator below (torch's float32 convolutions for the products where torch is installed,
the lower bound itself always from a float64 product with ``ConvApply``). The circulant
mathematics comes from ``specprof.engine.circulant`` (the ``fft-circulant`` backend's).
"""

from __future__ import annotations

import math
import time

import numpy as np

from specprof.engine import hookimpl
from specprof.engine.base import NOMINAL_FLOPS, Backend
from specprof.engine.circulant import (
    circulant_spectrum,
    circulant_spectrum_flops,
)
from specprof.engine.errors import InputShapeError
from specprof.engine.operator import (
    ConvGeometry,
    conv_geometry,
    embedding_grid,
)
from specprof.engine.parallel import one_blas_thread
from specprof.engine.types import Layer, Request, Spectrum, Support
from specprof.engine.zero_padded import (
    LANCZOS_PAIRS,
    circulant_form,
    top_singular_values,
    top_singular_values_flops,
)

BRACKET_TOLERANCE = 1e-2
"""Residual (relative) at which the lower bound's Lanczos run stops: the lower bound is valid
at any tolerance. On ResNet-18's 3x3 and 7x7 layers 1e-2 left it within 2e-6 to 2e-4 of the
value at 1e-3 (the Rayleigh quotient's error is about the square of the vector's), in 50
product pairs instead of 74-170: the stem conv's bracket took 0.6 s instead of 3.4 s. The
bracket's width is the circulant upper bound's (up to 2% on 7x7 inputs), not this."""
SPECTRUM_METHOD = "auto"
"""``circulant_spectrum``'s method for the sampled symbols (see ``symbol_singular_values``)."""
SPECTRUM_PRECISION = "float32"
"""``circulant_spectrum``'s precision for the sampled symbols: its float32 promise (1e-5 of
sigma_max; the float64 Grams it takes kept 2e-12 on ResNet-18's 128-512 channel layers) is
far inside the approximation's own error, and it was 1.5-1.9x faster than float64's SVDs
there (0.35 against 0.68 s at 128 channels, 1.14 against 1.72 s at 512)."""
FIT_FLOPS_PER_VALUE = 5000
"""Nominal flops per singular value of resampling the sorted samples and fitting the power
law (a sort, then up to ~50 root-finding steps, each a power of all values), for ``cost``."""

# --------------------------------------------------------------------------- exact facts


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


def symbol_singular_values(geom: ConvGeometry, grid: tuple[int, ...],
                           method: str = SPECTRUM_METHOD) -> np.ndarray:
    """All singular values of the polyphase symbol sampled on the DFT grid ``grid`` (sizes per
    dimension, in polyphase units): the spectrum of the strided circular convolution on the
    grid s * ``grid``, from ``circulant_spectrum`` (half grid, threads), expanded. ``method``
    is its method (``gram``, Grams' eigenvalues unchecked, was no faster on ResNet-18's layers
    in a side-by-side run, so the default stays ``auto``)."""
    values, multiplicities = circulant_spectrum(*circulant_form(geom, grid), method=method,
                                                precision=SPECTRUM_PRECISION)
    return np.repeat(values, multiplicities)


# --------------------------------------------------------------------------- bounds


def sigma_max_bracket(geom: ConvGeometry, tol: float = BRACKET_TOLERANCE) -> tuple[float, float]:
    """(lower, upper): certified bounds on ||A||_2 of the zero-padded convolution.

    upper: the circulant on the embedding grid (``certified_upper_bound``, one grid). lower:
    ||A x|| / ||x|| in float64 for the Ritz vector x of a short Lanczos run (torch float32
    products where installed) from the circulant's top vector, stopped at a residual of
    ``tol`` (``top_singular_values`` without its float64 refinement): valid for any x, and
    within ~tol of sigma_max in practice."""
    found = top_singular_values(geom, 1, tol=tol, upper_tries=1, refine=False)
    return found.lower_bound, found.upper_bound


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
                 bracket_tolerance: float = BRACKET_TOLERANCE) -> None:
        if adjust not in ADJUSTMENTS:
            raise ValueError(f"adjust must be one of {ADJUSTMENTS}")
        self.alpha = alpha
        self.adjust = adjust
        self.bracket_tolerance = bracket_tolerance

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
        """What ``compute`` does, in flops at ``NOMINAL_FLOPS``: the certified bracket on
        sigma_max (``top_singular_values_flops``: circulant norm on the embedding grid, a
        short Lanczos run, fewer pairs at a looser tolerance), the sampled symbols' spectrum
        and the fit of all values (approximation)."""
        geom = conv_geometry(layer)
        pairs = max(20, round(LANCZOS_PAIRS * math.log10(1 / self.bracket_tolerance) / 6))
        flops = top_singular_values_flops(geom, 1, lanczos_pairs=pairs)
        kernels, grid, strides, dilations = circulant_form(geom, sampling_grid(geom, self.alpha))
        flops += circulant_spectrum_flops(kernels.shape, grid, strides, dilations,
                                          method=SPECTRUM_METHOD, precision=SPECTRUM_PRECISION)
        flops += FIT_FLOPS_PER_VALUE * geom.n_values
        return flops / NOMINAL_FLOPS

    def compute(self, layer: Layer, request: Request) -> Spectrum:
        start = time.perf_counter()
        geom = conv_geometry(layer)
        with one_blas_thread():  # see specprof.engine.parallel; pieces run in worker threads
            lower, upper = sigma_max_bracket(geom, self.bracket_tolerance)
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

    def memory(self, layer: Layer, request: Request) -> int | None:
        """The bracket's matrix-free products and Lanczos vectors (24 for one value), the symbol matrices on the largest grid, and the approximation's copies of
        all values (samples, sort, resampling, power fit)."""
        from specprof.engine.circulant import half_grid_size
        from specprof.engine.limits import conv_products_bytes, lanczos_bytes

        geom = conv_geometry(layer)
        rows, cols = geom.shape
        products = conv_products_bytes(rows, cols, math.prod(geom.out), math.prod(geom.kernel),
                                       geom.c_in)
        grids = [embedding_grid(geom), sampling_grid(geom, self.alpha)]
        frequencies = max(half_grid_size(grid) for grid in grids)
        channels = geom.c_out * geom.c_in // geom.groups * math.prod(geom.strides)
        symbols = 3 * 16 * frequencies * channels
        values = 8 * 8 * max(geom.n_values, math.prod(sampling_grid(geom, self.alpha))
                             * min(geom.c_out, geom.c_in * math.prod(geom.strides)))
        return products + lanczos_bytes(geom.n_values, 24) + symbols + values


@hookimpl
def specprof_register_backends() -> list[type[Backend]]:
    return [ToeplitzBackend]
