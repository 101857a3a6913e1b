"""Zero-padded top-k (``specprof.engine.zero_padded`` through the ``exact`` backend) against
independent oracles: ARPACK on a LinearOperator whose products are torch's own
conv{1,2,3}d / conv_transpose{1,2,3}d in float64 (nothing of specprof's), and the dense matrix
from pushing the identity basis through torch's conv (``oracle.py``) on small layers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
import torch.nn.functional as F
from oracle import conv_matrix, conv_transpose_matrix

from specprof.engine.operator import conv_geometry
from specprof.engine.plugins import get_registry
from specprof.engine.profile import choose_backend
from specprof.engine.types import Layer, Request
from specprof.engine.zero_padded import top_singular_values
from specprof.plugins.backends.exact import ExactBackend

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv_layer(c_out: int, c_in: int, k: int, n: int, d: int = 2, stride: int = 1,
                dilation: int = 1, groups: int = 1, seed: int = 0) -> Layer:
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((c_out, c_in // groups, *(k,) * d)) / math.sqrt(c_in * k**d)
    pad = dilation * (k - 1) // 2
    return Layer(f"conv{d}d", "Conv", weight, strides=(stride,) * d, pads=(pad,) * (2 * d),
                 dilations=(dilation,) * d, groups=groups, input_shape=(c_in, *(n,) * d))


def _transpose_layer(c_in: int, c_out: int, k: int, n: int, stride: int, seed: int = 0) -> Layer:
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((c_in, c_out, k, k)) / math.sqrt(c_in * k * k)
    return Layer("convT", "ConvTranspose", weight, strides=(stride, stride), pads=(1,) * 4,
                 output_padding=(stride - 1,) * 2, input_shape=(c_in, n, n))


def torch_operator(layer: Layer) -> scipy.sparse.linalg.LinearOperator:
    """The layer's map and its adjoint from torch's functions, float64."""
    d = layer.spatial_dims
    w = torch.tensor(np.asarray(layer.weight, dtype=np.float64))
    pad = tuple(layer.pads[:d])
    assert pad == tuple(layer.pads[d:]), "symmetric pads only in this oracle"
    common = {"stride": layer.strides, "dilation": layer.dilations, "groups": layer.groups}
    shape_in = (1, *layer.input_shape)
    if layer.op_type == "Conv":
        out = _CONV[d](torch.zeros(shape_in, dtype=torch.float64), w, padding=pad, **common).shape
        size = [n + 2 * p for n, p in zip(layer.input_shape[1:], pad, strict=True)]
        extra = tuple(sz - ((o - 1) * s + dl * (k - 1) + 1) for sz, o, s, dl, k in zip(
            size, out[2:], layer.strides, layer.dilations, layer.kernel_shape, strict=True))

        def forward(x: np.ndarray) -> np.ndarray:
            return _CONV[d](torch.tensor(x).reshape(shape_in), w, padding=pad,
                            **common).numpy().ravel()

        def adjoint(y: np.ndarray) -> np.ndarray:
            return _CONV_T[d](torch.tensor(y).reshape(out), w, padding=pad,
                              output_padding=extra, **common).numpy().ravel()
    else:
        op = tuple(layer.output_padding)
        out = _CONV_T[d](torch.zeros(shape_in, dtype=torch.float64), w, padding=pad,
                         output_padding=op, **common).shape

        def forward(x: np.ndarray) -> np.ndarray:
            return _CONV_T[d](torch.tensor(x).reshape(shape_in), w, padding=pad,
                              output_padding=op, **common).numpy().ravel()

        def adjoint(y: np.ndarray) -> np.ndarray:
            return _CONV[d](torch.tensor(y).reshape(out), w, padding=pad,
                            **common).numpy().ravel()
    return scipy.sparse.linalg.LinearOperator(
        (math.prod(out), math.prod(shape_in)), matvec=forward, rmatvec=adjoint,
        dtype=np.float64)


def arpack_oracle(layer: Layer, k: int) -> np.ndarray:
    values = scipy.sparse.linalg.svds(torch_operator(layer), k=k, tol=0,
                                      return_singular_vectors=False,
                                      rng=np.random.default_rng(1))
    return np.sort(values)[::-1]


ARPACK_CASES = {
    "3x3 64->64 @24": _conv_layer(64, 64, 3, 24),
    "3x3 stride 2 32->64 @32": _conv_layer(64, 32, 3, 32, stride=2),
    "1x1 stride 2 64->128 @16": _conv_layer(128, 64, 1, 16, stride=2),
    "3x3 dilation 2 16->16 @20": _conv_layer(16, 16, 3, 20, dilation=2),
    "3x3 groups 4 32->32 @16": _conv_layer(32, 32, 3, 16, groups=4),
    "3x3 depthwise 32 @16": _conv_layer(32, 32, 3, 16, groups=32),
    "7x7 stride 2 3->16 @48": _conv_layer(16, 3, 7, 48, stride=2),
    "ConvTranspose 4x4 s2 32->16 @12": _transpose_layer(32, 16, 4, 12, stride=2),
    "1d 5 taps 16->24 @64": _conv_layer(24, 16, 5, 64, d=1),
    "3d 3x3x3 8->8 @10": _conv_layer(8, 8, 3, 10, d=3),
}


@pytest.mark.parametrize("name", list(ARPACK_CASES))
def test_top_1_matches_torch_arpack_oracle(name: str) -> None:
    layer = ARPACK_CASES[name]
    truth = arpack_oracle(layer, 1)[0]
    spectrum = ExactBackend().compute(layer, Request(top_k=1))
    assert spectrum.values[0] == pytest.approx(truth, rel=1e-6)
    assert spectrum.lower_bound <= truth * (1 + 1e-12)
    assert spectrum.upper_bound >= truth * (1 - 1e-12)
    assert not spectrum.complete and spectrum.exact


@pytest.mark.parametrize("name", ["3x3 stride 2 32->64 @32", "3x3 groups 4 32->32 @16",
                                  "ConvTranspose 4x4 s2 32->16 @12"])
def test_top_3_matches_torch_arpack_oracle(name: str) -> None:
    layer = ARPACK_CASES[name]
    truth = arpack_oracle(layer, 3)
    spectrum = ExactBackend().compute(layer, Request(top_k=3))
    np.testing.assert_allclose(spectrum.values, truth, rtol=1e-6)


def _dense(layer: Layer) -> np.ndarray:
    d = layer.spatial_dims
    common = {"stride": layer.strides, "dilation": layer.dilations, "groups": layer.groups}
    if layer.op_type == "Conv":
        return conv_matrix(layer.weight, layer.input_shape, padding=tuple(layer.pads[:d]),
                           **common)
    return conv_transpose_matrix(layer.weight, layer.input_shape, padding=tuple(layer.pads[:d]),
                                 output_padding=tuple(layer.output_padding), **common)


DENSE_CASES = [
    _conv_layer(8, 8, 3, 10, seed=1),
    _conv_layer(8, 4, 5, 9, stride=2, seed=2),
    _conv_layer(6, 6, 3, 11, dilation=3, seed=3),
    _conv_layer(8, 8, 3, 8, groups=8, seed=4),
    _transpose_layer(6, 4, 3, 6, stride=2, seed=5),
    _conv_layer(4, 3, 3, 7, d=3, seed=6),
]


@pytest.mark.parametrize("layer", DENSE_CASES, ids=[f"{i}:{c.describe()}" for i, c in
                                                    enumerate(DENSE_CASES)])
def test_top_k_certified_against_dense_oracle(layer: Layer) -> None:
    truth = np.linalg.svd(_dense(layer), compute_uv=False)
    found = top_singular_values(conv_geometry(layer), 4)
    np.testing.assert_allclose(found.values, truth[:4], rtol=1e-6)
    # Each certified error really bounds the distance to some singular value.
    for value, error in zip(found.values, found.errors, strict=True):
        assert error <= 1e-6
        assert np.min(np.abs(truth - value)) <= error * value * (1 + 1e-9)
    assert found.lower_bound <= truth[0] <= found.upper_bound


def test_bracket_open_yet_value_exact() -> None:
    """The circulant bound stays above the true norm here, so only the residual stops."""
    layer = _conv_layer(16, 16, 3, 12, seed=7)
    truth = np.linalg.svd(_dense(layer), compute_uv=False)[0]
    found = top_singular_values(conv_geometry(layer), 1)
    assert found.upper_bound > truth * (1 + 1e-4)
    assert not found.bracket_closed
    assert found.values[0] == pytest.approx(truth, rel=1e-6)


def test_pointwise_is_exact_from_the_weight() -> None:
    layer = _conv_layer(48, 32, 1, 9, stride=2, seed=8)
    truth = np.linalg.svd(_dense(layer), compute_uv=False)
    found = top_singular_values(conv_geometry(layer), 3)
    np.testing.assert_allclose(found.values, truth[:3], rtol=1e-12)
    assert found.products == 0 and found.bracket_closed


def test_auto_top_k_runs_the_exact_zero_padded_solver() -> None:
    layer = _conv_layer(64, 64, 3, 56)
    backend, reason = choose_backend(layer, Request(top_k=1), "auto", get_registry())
    assert backend is not None and backend.name == "exact" and "top-1" in reason
    assert ExactBackend().cost(layer, Request(top_k=1)) < ExactBackend().cost(
        layer, Request(top_k=1, boundary="circular"))
