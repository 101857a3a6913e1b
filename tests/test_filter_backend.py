"""The filter SVD (DeepDataProfiler) against NumPy's SVD of the unfolded weight."""

from __future__ import annotations

import numpy as np
import pytest

from specprof.engine.errors import BackendError
from specprof.engine.types import Layer, Request
from specprof.plugins.backends.filter import FilterBackend


def _weight(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(7 + seed).standard_normal(shape)


def _transpose_reference(weight: np.ndarray, groups: int) -> np.ndarray:
    """Unfolded ConvTranspose weight built row by row: output channel g*cout_g + j reads
    the filters W[ci, j] of the input channels ci of its group g."""
    c_in, cout_g = weight.shape[:2]
    cin_g = c_in // groups
    rows = []
    for g in range(groups):
        for j in range(cout_g):
            rows.append(np.concatenate([weight[g * cin_g + i, j].ravel() for i in range(cin_g)]))
    return np.array(rows)


def _cases() -> list[tuple[str, Layer, np.ndarray]]:
    conv = _weight(6, 3, 3, 3)
    conv1d = _weight(5, 4, 3, seed=1)
    grouped = _weight(8, 2, 3, 3, seed=2)
    conv3d = _weight(4, 2, 2, 3, 2, seed=3)
    wide = _weight(2, 16, 1, 1, seed=4)
    convt = _weight(3, 5, 3, 3, seed=5)
    convt_grouped = _weight(4, 3, 2, 2, seed=6)
    gemm = _weight(7, 10, seed=7)
    # References are computed before the Layer freezes each weight.
    refs = [
        conv.reshape(6, -1), conv1d.reshape(5, -1), grouped.reshape(8, -1),
        conv3d.reshape(4, -1), wide.reshape(2, -1), np.moveaxis(convt, 1, 0).reshape(5, -1),
        _transpose_reference(convt_grouped, 2), gemm.copy(),
    ]
    layers = [
        Layer(name="conv2d", op_type="Conv", weight=conv),
        Layer(name="conv1d", op_type="Conv", weight=conv1d),
        Layer(name="grouped", op_type="Conv", weight=grouped, groups=4),
        Layer(name="conv3d", op_type="Conv", weight=conv3d),
        Layer(name="wide-1x1", op_type="Conv", weight=wide),
        Layer(name="convT", op_type="ConvTranspose", weight=convt, strides=(2, 2)),
        Layer(name="convT-groups", op_type="ConvTranspose", weight=convt_grouped, groups=2),
        Layer(name="gemm", op_type="Gemm", weight=gemm),
    ]
    return [(layer.name, layer, ref) for layer, ref in zip(layers, refs, strict=True)]


CASES = _cases()


@pytest.mark.parametrize(("case_id", "layer", "unfolded"), CASES, ids=[c[0] for c in CASES])
def test_filter_svd_matches_numpy(case_id, layer, unfolded):
    backend = FilterBackend()
    request = Request()
    assert backend.supports(layer, request)
    spectrum = backend.compute(layer, request)
    u_ref, s_ref, _ = np.linalg.svd(unfolded, full_matrices=False)
    rank = min(unfolded.shape)
    np.testing.assert_allclose(spectrum.values, s_ref, rtol=1e-12, atol=1e-12 * s_ref[0])
    u = spectrum.left_vectors
    assert u.shape == (unfolded.shape[0], rank)
    np.testing.assert_allclose(u.T @ u, np.eye(rank), atol=1e-12)
    # Random weights have distinct singular values, so each vector is unique up to sign.
    signs = np.sign(np.sum(u * u_ref, axis=0))
    np.testing.assert_allclose(u * signs, u_ref, atol=1e-10)
    # And U S spans the weight's columns: U U^T W = W.
    np.testing.assert_allclose(u @ (u.T @ unfolded), unfolded, atol=1e-10)
    assert spectrum.kind == "filter" and spectrum.backend == "filter" and spectrum.exact
    assert spectrum.boundary is None and spectrum.params == {}


def test_filter_needs_no_input_shape_and_can_drop_vectors():
    _, layer, unfolded = CASES[0]
    assert layer.input_shape is None
    spectrum = FilterBackend().compute(layer, Request(keep_vectors=False))
    assert spectrum.left_vectors is None
    np.testing.assert_allclose(spectrum.values, np.linalg.svd(unfolded, compute_uv=False),
                               rtol=1e-12)


def test_filter_spectrum_ignores_boundary():
    _, layer, _ = CASES[0]
    zeros = FilterBackend().compute(layer, Request(boundary="zeros"))
    circular = FilterBackend().compute(layer, Request(boundary="circular"))
    np.testing.assert_array_equal(zeros.values, circular.values)


def test_filter_refuses_cuda():
    _, layer, _ = CASES[0]
    support = FilterBackend().supports(layer, Request(device="cuda"))
    assert not support and "CPU" in support.reason


def test_filter_non_finite_weights_raise():
    weight = _weight(3, 2, 3, 3)
    weight[1, 0, 0, 0] = np.nan
    layer = Layer(name="nan-layer", op_type="Conv", weight=weight)
    with pytest.raises(BackendError, match="non-finite"):
        FilterBackend().compute(layer, Request())
