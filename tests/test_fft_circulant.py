"""fft-circulant against the dense circular oracle (tests/oracle.py), for every layer kind.

Error measure: max |ours - oracle| / oracle sigma_max over all singular values, expanded by
multiplicity and sorted. It is the accuracy LAPACK itself guarantees for the oracle, so it is
the fair yardstick (a value 1e-14 * sigma_max has no relative accuracy in either).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import conv_matrix, singular_values

from specprof.engine.circulant import (
    certified_below,
    conv_form,
    frequency_multiplicities,
    gram_matrices,
    top_k_of,
    uncertified,
)
from specprof.engine.types import Layer, Request
from specprof.plugins.backends.fft_circulant import FftCirculantBackend

CIRCULAR = Request(boundary="circular")


def _tuple(value: int | tuple[int, ...], d: int) -> tuple[int, ...]:
    return (value,) * d if isinstance(value, int) else tuple(value)


def _layer(weight: np.ndarray, input_shape: tuple[int, ...], op: str = "Conv", stride=1,
           dilation=1, groups: int = 1, pads: tuple[int, ...] = ()) -> Layer:
    d = weight.ndim - 2
    return Layer("layer", op, weight, strides=_tuple(stride, d), dilations=_tuple(dilation, d),
                 groups=groups, input_shape=input_shape, pads=pads)


def _oracle(layer: Layer) -> np.ndarray:
    """Singular values of the dense circular operator (min(rows, cols) of them)."""
    w = np.array(layer.weight)
    if layer.op_type == "ConvTranspose":
        # The transpose's circular operator is the adjoint of the conv with the same weight
        # on the output grid m * s: its matrix is that conv's matrix transposed.
        grid = tuple(m * s for m, s in zip(layer.input_shape[1:], layer.strides, strict=True))
        conv_input = (layer.out_channels, *grid)
        matrix = conv_matrix(w, conv_input, stride=layer.strides, dilation=layer.dilations,
                             groups=layer.groups, circular=True).T
    else:
        matrix = conv_matrix(w, layer.input_shape, stride=layer.strides,
                             dilation=layer.dilations, groups=layer.groups, circular=True)
    values = singular_values(matrix)
    assert values.size == min(matrix.shape)
    return values


def _wide_kernel_oracle(weight: np.ndarray, input_shape: tuple[int, ...],
                        dilation: int = 1) -> np.ndarray:
    """Circular conv for kernels much larger than the grid (the shared oracle tiles the input
    3 times, enough only for a dilated kernel <= n + 1): tile as often as the kernel needs,
    stride 1. Output p reads input (p + a * dilation) mod n."""
    n = input_shape[1:]
    d = len(n)
    size = math.prod(input_shape)
    basis = torch.eye(size, dtype=torch.float64).reshape(size, *input_shape)
    repeats = [math.ceil((k - 1) * dilation / m) + 1 for k, m in zip(weight.shape[2:], n, strict=True)]
    tiled = basis.repeat(1, 1, *repeats)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[d]
    out = conv(tiled, torch.as_tensor(np.array(weight)), dilation=dilation)
    out = out[(slice(None), slice(None), *[slice(0, m) for m in n])]
    return singular_values(out.reshape(size, -1).T.numpy())


def _error(ours: np.ndarray, reference: np.ndarray) -> float:
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.max(np.abs(np.sort(ours)[::-1] - reference)) / reference[0])


RNG_SEED = 1234

CASES = {
    # name: (weight shape, input shape, extra layer arguments)
    "3x3 even n": ((4, 3, 3, 3), (3, 6, 6), {}),
    "3x3 odd n": ((4, 3, 3, 3), (3, 5, 5), {}),
    "3x3 non-square": ((3, 4, 3, 3), (4, 5, 8), {}),
    "c_out < c_in": ((2, 5, 3, 3), (5, 4, 4), {}),
    "kernel > n": ((3, 2, 4, 4), (2, 3, 3), {}),
    "5x5 kernel": ((3, 2, 5, 5), (2, 6, 7), {}),
    "1x1": ((5, 3, 1, 1), (3, 4, 5), {}),
    "1x1 stride 2": ((5, 3, 1, 1), (3, 4, 6), {"stride": 2}),
    "groups": ((6, 2, 3, 3), (4, 5, 6), {"groups": 2}),
    "depthwise": ((4, 1, 3, 3), (4, 6, 5), {"groups": 4}),
    "depthwise x2": ((8, 1, 3, 3), (4, 6, 4), {"groups": 4}),
    "dilation 2": ((3, 3, 3, 3), (3, 8, 7), {"dilation": 2}),
    "stride 2": ((4, 3, 3, 3), (3, 8, 8), {"stride": 2}),
    "stride 2 groups": ((4, 2, 3, 3), (4, 6, 4), {"stride": 2, "groups": 2}),
    "stride (2,1)": ((4, 3, 3, 3), (3, 8, 6), {"stride": (2, 1)}),
    "stride 2 kernel 7": ((4, 3, 7, 7), (3, 8, 8), {"stride": 2}),
    "ConvTranspose s1": ((3, 4, 3, 3), (3, 5, 4), {"op": "ConvTranspose"}),
    "ConvTranspose s2": ((3, 4, 3, 3), (3, 3, 4), {"op": "ConvTranspose", "stride": 2}),
    "ConvTranspose s2 g2": ((4, 2, 3, 3), (4, 3, 3),
                            {"op": "ConvTranspose", "stride": 2, "groups": 2}),
    "Conv1d": ((3, 4, 3), (4, 10), {}),
    "Conv1d stride 2": ((3, 4, 5), (4, 12), {"stride": 2}),
    "Conv3d": ((3, 2, 3, 3, 3), (2, 4, 4, 3), {}),
    "Conv3d stride (2,1,1)": ((2, 2, 3, 3, 3), (2, 4, 3, 3), {"stride": (2, 1, 1)}),
}


def _case_layer(name: str) -> Layer:
    weight_shape, input_shape, extra = CASES[name]
    weight = np.random.default_rng(RNG_SEED).standard_normal(weight_shape)
    return _layer(weight, input_shape, **extra)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_circular_oracle_float64(name: str) -> None:
    layer = _case_layer(name)
    backend = FftCirculantBackend()
    assert backend.supports(layer, CIRCULAR)
    spectrum = backend.compute(layer, CIRCULAR)
    reference = _oracle(layer)
    assert spectrum.n_values == reference.size
    assert _error(spectrum.expanded(), reference) <= 1e-10
    assert spectrum.exact and spectrum.boundary == "circular" and spectrum.kind == "operator"


@pytest.mark.parametrize("kernel,n,dilation", [(7, 3, 1), (9, 4, 1), (6, 2, 1), (3, 4, 3),
                                               (5, 3, 2)])
def test_kernel_much_larger_than_grid_wraps(kernel: int, n: int, dilation: int) -> None:
    weight = np.random.default_rng(kernel).standard_normal((3, 2, kernel, kernel))
    layer = _layer(weight, (2, n, n), dilation=dilation)
    spectrum = FftCirculantBackend().compute(layer, CIRCULAR)
    reference = _wide_kernel_oracle(weight, (2, n, n), dilation)
    assert _error(spectrum.expanded(), reference) <= 1e-10


def test_half_grid_multiplicities_not_expanded() -> None:
    layer = _case_layer("3x3 even n")  # 6x6 grid: half grid 6x4, planes f_2 = 0 and 3 once
    spectrum = FftCirculantBackend().compute(layer, CIRCULAR)
    assert spectrum.values.size == 6 * 4 * 3
    assert sorted(set(spectrum.multiplicities.tolist())) == [1, 2]


def test_pointwise_and_matrix_keep_one_copy() -> None:
    pointwise = FftCirculantBackend().compute(_case_layer("1x1"), CIRCULAR)
    assert pointwise.values.size == 3 and (pointwise.multiplicities == 20).all()
    matrix = np.random.default_rng(3).standard_normal((7, 4))
    gemm = FftCirculantBackend().compute(Layer("fc", "Gemm", matrix), Request())
    assert gemm.multiplicities is None
    np.testing.assert_allclose(gemm.values, singular_values(matrix), rtol=1e-12)


@pytest.mark.parametrize("name", ["3x3 odd n", "stride 2", "groups", "Conv3d"])
def test_float32_within_1e_5(name: str) -> None:
    layer = _case_layer(name)
    spectrum = FftCirculantBackend().compute(layer, Request(boundary="circular",
                                                              precision="float32"))
    assert _error(spectrum.expanded(), _oracle(layer)) <= 1e-5


@pytest.mark.parametrize("name", ["3x3 non-square", "c_out < c_in", "stride 2", "Conv1d"])
def test_gram_path_within_1e_8(name: str) -> None:
    layer = _case_layer(name)
    spectrum = FftCirculantBackend(method="gram").compute(layer, CIRCULAR)
    assert _error(spectrum.expanded(), _oracle(layer)) <= 1e-8


def test_auto_takes_the_gram_path_and_stays_within_1e_10() -> None:
    layer = _layer(np.random.default_rng(11).standard_normal((16, 16, 3, 3)), (16, 8, 8))
    spectrum = FftCirculantBackend().compute(layer, CIRCULAR)
    assert spectrum.note.startswith("Gram eigenvalues")
    assert _error(spectrum.expanded(), _oracle(layer)) <= 1e-10
    svd = FftCirculantBackend(method="svd").compute(layer, CIRCULAR)
    assert svd.note.startswith("svd")


@pytest.mark.parametrize("weight_shape,input_shape,stride,gram", [
    ((64, 64, 3, 3), (64, 8, 8), 1, True),       # square, r = 64
    ((128, 128, 3, 3), (128, 8, 8), 1, False),   # square, r = 128: mostly ill-conditioned
    ((128, 128, 3, 3), (128, 8, 8), 2, True),    # 128 x 512 symbols
    ((256, 128, 3, 3), (128, 4, 4), 1, True),    # 256 x 128 symbols
])
def test_auto_picks_the_gram_path_where_it_pays(weight_shape: tuple[int, ...],
                                                 input_shape: tuple[int, ...], stride: int,
                                                 gram: bool) -> None:
    layer = _layer(np.random.default_rng(13).standard_normal(weight_shape), input_shape,
                   stride=stride)
    auto = FftCirculantBackend().compute(layer, CIRCULAR)
    assert auto.note.startswith("Gram eigenvalues") == gram
    svd = FftCirculantBackend(method="svd").compute(layer, CIRCULAR)
    assert _error(auto.expanded(), svd.expanded()) <= 1e-10


def test_auto_sends_rank_deficient_symbols_to_svd() -> None:
    # Output channels 0 and 1 are the same filter: every symbol has a zero singular value,
    # which sqrt(eigenvalue of the Gram) would give as ~1e-8 sigma_max.
    weight = np.random.default_rng(12).standard_normal((8, 8, 3, 3))
    weight[1] = weight[0]
    layer = _layer(weight, (8, 6, 6))
    spectrum = FftCirculantBackend().compute(layer, CIRCULAR)
    reference = _oracle(layer)
    assert _error(spectrum.expanded(), reference) <= 1e-12
    ours = np.sort(spectrum.expanded())
    assert ours[:6 * 6].max() <= 1e-13 * reference[0]  # one zero per frequency, kept zero


@pytest.mark.parametrize("name", ["3x3 even n", "stride (2,1)", "depthwise", "ConvTranspose s2",
                                  "Conv3d"])
@pytest.mark.parametrize("method", ["svd", "gram"])
def test_torch_cpu_path_agrees_with_numpy(name: str, method: str) -> None:
    layer = _case_layer(name)
    ours = FftCirculantBackend(method=method).compute(layer, CIRCULAR)
    via_torch = FftCirculantBackend(method=method, _torch_on_cpu=True).compute(layer, CIRCULAR)
    np.testing.assert_array_equal(ours.multiplicities, via_torch.multiplicities)
    assert _error(via_torch.expanded(), ours.expanded()) <= 1e-10


def test_threaded_batches_agree() -> None:
    layer = _layer(np.random.default_rng(5).standard_normal((3, 3, 3, 3)), (3, 12, 12))
    one = FftCirculantBackend(threads=1).compute(layer, CIRCULAR).expanded()
    two = FftCirculantBackend(threads=2).compute(layer, CIRCULAR).expanded()
    np.testing.assert_allclose(one, two, rtol=0, atol=1e-13 * one[0])


@pytest.mark.parametrize("k", [1, 5, 7, 40])
def test_top_k_counts_multiplicities(k: int) -> None:
    layer = _case_layer("3x3 even n")
    reference = _oracle(layer)
    spectrum = FftCirculantBackend().compute(layer, Request(boundary="circular", top_k=k))
    assert spectrum.n_values == k
    assert _error(spectrum.expanded(), reference[:k]) <= 1e-10


def test_top_k_of_trims_last_multiplicity() -> None:
    values, mult = top_k_of(np.array([1.0, 3.0, 2.0]), np.array([4, 2, 2]), 3)
    assert values.tolist() == [3.0, 2.0] and mult.tolist() == [2, 1]


def test_supports_says_why_not() -> None:
    backend = FftCirculantBackend()
    conv = _case_layer("3x3 even n")
    no_shape = _layer(np.ones((2, 2, 3, 3)), None)
    assert "--input-shape" in backend.supports(no_shape, CIRCULAR).reason
    zeros = backend.supports(conv, Request(boundary="zeros"))
    assert not zeros and "toeplitz" in zeros.reason and "exact" in zeros.reason
    odd = _layer(np.ones((2, 2, 3, 3)), (2, 5, 6), stride=2)
    assert "divisible" in backend.supports(odd, CIRCULAR).reason
    nan = _layer(np.full((2, 2, 3, 3), np.nan), (2, 4, 4))
    assert "NaN" in backend.supports(nan, CIRCULAR).reason
    if not torch.cuda.is_available():
        assert "CUDA" in backend.supports(conv, Request(boundary="circular", device="cuda")).reason


def test_zero_padding_accepted_only_where_it_equals_circular() -> None:
    backend = FftCirculantBackend()
    zeros = Request(boundary="zeros")
    pointwise = _case_layer("1x1")
    assert backend.supports(pointwise, zeros)
    padded = _layer(np.array(pointwise.weight), (3, 4, 5), pads=(1, 1, 1, 1))
    assert not backend.supports(padded, zeros)
    # The claim behind it: a 1x1, unpadded conv is the same operator with zero padding.
    weight = np.array(pointwise.weight)
    np.testing.assert_array_equal(conv_matrix(weight, (3, 4, 5)),
                                  conv_matrix(weight, (3, 4, 5), circular=True))
    reference = singular_values(conv_matrix(weight, (3, 4, 5)))
    assert _error(backend.compute(pointwise, zeros).expanded(), reference) <= 1e-10


def test_registered_through_the_hook() -> None:
    from specprof.plugins.backends import fft_circulant

    assert fft_circulant.specprof_register_backends() == [FftCirculantBackend]


# --------------------------------------------------------------------------------------------
# The certified top-k path (Gram + Cholesky certificates, SVD only where needed).


@pytest.mark.parametrize("name", ["3x3 odd n", "stride 2", "groups", "c_out < c_in",
                                  "stride (2,1)", "Conv3d", "ConvTranspose s2", "depthwise"])
@pytest.mark.parametrize("k", [1, 3])
def test_certified_top_k_matches_oracle(name: str, k: int) -> None:
    layer = _case_layer(name)
    spectrum = FftCirculantBackend().compute(layer, Request(boundary="circular", top_k=k))
    assert "certified" in spectrum.note
    assert spectrum.n_values == k
    assert _error(spectrum.expanded(), _oracle(layer)[:k]) <= 1e-10


def test_certified_top_k_skips_frequencies_and_stays_exact() -> None:
    # 16x16 grid: 144 half-grid symbols; top-1 needs only a few SVDs.
    layer = _layer(np.random.default_rng(7).standard_normal((6, 5, 3, 3)), (5, 16, 16))
    spectrum = FftCirculantBackend().compute(layer, Request(boundary="circular", top_k=1))
    computed = int(spectrum.note.split("decomposed ")[1].split(" of")[0])
    assert computed < 20
    assert _error(spectrum.expanded(), _oracle(layer)[:1]) <= 1e-10


def test_certified_top_k_rank_deficient() -> None:
    # Every tap is the same rank-1 channel matrix: symbols of rank <= 1, most values ~0,
    # singular Grams (the certificate must still hold and the top values stay exact).
    rng = np.random.default_rng(11)
    channel = np.outer(rng.standard_normal(6), rng.standard_normal(4))
    weight = channel[:, :, None, None] * rng.standard_normal((3, 3))
    layer = _layer(weight, (4, 8, 8))
    reference = _oracle(layer)
    assert (reference < 1e-8 * reference[0]).sum() > reference.size // 2
    for k in (1, 5):
        spectrum = FftCirculantBackend().compute(layer, Request(boundary="circular", top_k=k))
        assert "certified" in spectrum.note
        assert _error(spectrum.expanded(), reference[:k]) <= 1e-10


def test_cholesky_certificate_is_sharp_but_safe() -> None:
    rng = np.random.default_rng(3)
    symbol = rng.standard_normal((20, 7)) + 1j * rng.standard_normal((20, 7))
    gram = symbol.conj().T @ symbol
    top = float(np.linalg.svd(symbol, compute_uv=False)[0]) ** 2
    assert certified_below(gram, top * (1 + 1e-8), inner=20)
    assert not certified_below(gram, top * (1 - 1e-8), inner=20)
    assert not certified_below(gram, top, inner=20)  # the rounding margin is never given away


# --------------------------------------------------------------------------------------------
# The Gram polynomial behind the certified path (Grams straight from the kernel).


@pytest.mark.parametrize("name", ["3x3 odd n", "c_out < c_in", "kernel > n", "stride 2",
                                  "stride (2,1)", "stride 2 kernel 7", "groups", "dilation 2",
                                  "Conv1d stride 2", "Conv3d stride (2,1,1)", "ConvTranspose s2"])
def test_gram_polynomial_eigenvalues_are_squared_oracle_values(name: str) -> None:
    layer = _case_layer(name)
    kernels, grid, strides, dilations = conv_form(layer)
    grams, errors, _ = gram_matrices(kernels, grid, strides, dilations)
    assert np.abs(grams - grams.conj().swapaxes(-1, -2)).max() <= 1e-12 * np.abs(grams).max()
    eigenvalues = np.linalg.eigvalsh(grams)  # (groups * half grid, r), ascending
    # Expand by multiplicity like the backend does, then compare with the dense oracle.
    small = tuple(n // s for n, s in zip(grid, strides, strict=True))
    per_frequency = np.tile(frequency_multiplicities(small).ravel(), kernels.shape[0])
    squared = np.repeat(eigenvalues.ravel(), np.repeat(per_frequency, eigenvalues.shape[1]))
    reference = _oracle(layer) ** 2
    ours = np.sort(squared)[::-1][:reference.size]
    assert np.abs(ours - reference).max() <= 1e-12 * reference[0]
    # The stated rounding bound holds and is far below the values it certifies.
    assert (errors >= 0).all() and errors.max() <= 1e-8 * reference[0]


def testuncertified_finds_the_one_gram_above_the_bound() -> None:
    rng = np.random.default_rng(4)
    symbols = rng.standard_normal((40, 9, 6)) + 1j * rng.standard_normal((40, 9, 6))
    grams = symbols.conj().swapaxes(-1, -2) @ symbols
    tops = np.linalg.eigvalsh(grams)[:, -1]
    bound = float(np.sort(tops)[-3]) * (1 + 1e-9)  # the two largest are above it
    expected = np.flatnonzero(tops > bound)
    assert expected.size == 2
    np.testing.assert_array_equal(uncertified(grams, bound, 9, 1e-12), expected)
    assert uncertified(grams, float(tops.max()) * 1.001, 9, 1e-12).size == 0
    # Batched and one-by-one agree on every matrix, including those right at the bound.
    close = float(np.sort(tops)[-5])
    single = [i for i in range(40) if not certified_below(grams[i], close, 9, 1e-12)]
    np.testing.assert_array_equal(uncertified(grams, close, 9, 1e-12), single)


@pytest.mark.parametrize("kernel,n,dilation", [(7, 3, 1), (3, 4, 3)])
def test_certified_top_k_kernel_larger_than_grid(kernel: int, n: int, dilation: int) -> None:
    weight = np.random.default_rng(kernel).standard_normal((3, 2, kernel, kernel))
    layer = _layer(weight, (2, n, n), dilation=dilation)
    spectrum = FftCirculantBackend().compute(layer, Request(boundary="circular", top_k=2))
    assert "certified" in spectrum.note
    reference = _wide_kernel_oracle(weight, (2, n, n), dilation)
    assert _error(spectrum.expanded(), reference[:2]) <= 1e-10


def test_certified_top_k_many_frequencies_one_thread_and_two() -> None:
    # Enough frequencies for several pieces per thread and the Lanczos refinement.
    layer = _layer(np.random.default_rng(9).standard_normal((5, 4, 3, 3)), (4, 24, 20))
    reference = _oracle(layer)
    for threads in (1, 2):
        spectrum = FftCirculantBackend(threads=threads).compute(
            layer, Request(boundary="circular", top_k=3))
        assert "certified" in spectrum.note
        assert _error(spectrum.expanded(), reference[:3]) <= 1e-10


# --------------------------------------------------------------------------------------------
# Top-k of 1x1 kernels: the top of the weight matrix's Gram, SVD where values are small.


@pytest.mark.parametrize(("weight_shape", "input_shape", "extra"), [
    ((3, 7, 1, 1), (7, 4, 5), {}),  # c_out < c_in
    ((9, 4, 1, 1), (4, 5, 4), {}),  # c_out > c_in
    ((9, 3, 1, 1), (3, 4, 6), {"stride": 2}),  # polyphase zero columns
    ((12, 4, 1, 1), (8, 3, 4), {"groups": 2}),
])
@pytest.mark.parametrize("k", [1, 3])
def test_pointwise_top_k_matches_oracle(weight_shape: tuple[int, ...],
                                        input_shape: tuple[int, ...], extra: dict,
                                        k: int) -> None:
    layer = _layer(np.random.default_rng(5).standard_normal(weight_shape), input_shape, **extra)
    if 2 * k > min(weight_shape[:2]):
        k = 1  # the top-k path is for few values of the matrix; k=3 of 3 is the full path
    spectrum = FftCirculantBackend().compute(layer, Request(boundary="circular", top_k=k))
    assert "weight matrix" in spectrum.note
    assert spectrum.n_values == k
    assert _error(spectrum.expanded(), _oracle(layer)[:k]) <= 1e-10


def test_pointwise_top_k_rank_deficient_falls_back_to_svd() -> None:
    # Nearly rank 1: the 2nd and 3rd values are ~1e-7 sigma_max, which the Gram cannot
    # resolve (its absolute error ~ u sigma_max^2 is ~1e-9 sigma_max in sigma); the SVD can.
    # A 1x1 grid: multiplicity 1, so the top 3 are the matrix's 3 largest values.
    rng = np.random.default_rng(3)
    weight = np.outer(rng.standard_normal(8), rng.standard_normal(6))
    weight += 1e-7 * rng.standard_normal((8, 6))
    layer = _layer(weight[:, :, None, None], (6, 1, 1))
    reference = _oracle(layer)
    spectrum = FftCirculantBackend().compute(layer, Request(boundary="circular", top_k=3))
    assert "weight matrix" in spectrum.note
    ours = np.sort(spectrum.expanded())[::-1]
    assert reference[2] < 1e-6 * reference[0]
    # Relative accuracy of the small values themselves, far beyond what the Gram gives.
    np.testing.assert_allclose(ours, reference[:3], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Cost estimates (``Backend.cost``): positive, and ordered like the work compute does.


def test_cost_follows_the_route_compute_takes() -> None:
    from specprof.engine.circulant import layer_route

    backend = FftCirculantBackend()
    rng = np.random.default_rng(2)
    big = _layer(rng.standard_normal((64, 64, 3, 3)), (64, 56, 56), pads=(1, 1, 1, 1))
    small = _layer(rng.standard_normal((64, 64, 3, 3)), (64, 14, 14), pads=(1, 1, 1, 1))
    top1 = Request(boundary="circular", top_k=1)
    assert layer_route(big) == "gram checked" and layer_route(big, top_k=1) == "certified top-k"
    full, certified = backend.cost(big, CIRCULAR), backend.cost(big, top1)
    assert full is not None and certified is not None
    assert 0 < certified < full  # the certificates skip most eigensolves
    assert backend.cost(small, CIRCULAR) < full  # 16x fewer frequencies
    pointwise = _layer(rng.standard_normal((64, 256, 1, 1)), (256, 56, 56))
    assert layer_route(pointwise) == "pointwise"
    assert backend.cost(pointwise, CIRCULAR) < 1e-2 * full  # one SVD, not one per frequency
    gemm = Layer("fc", "Gemm", rng.standard_normal((1000, 512)), input_shape=(512,))
    assert layer_route(gemm) == "matrix" and backend.cost(gemm, CIRCULAR) > 0
    assert FftCirculantBackend(method="svd").cost(big, CIRCULAR) > full  # SVDs cost more
