"""The exact backend and the operator it is built on, against the torch oracle."""

from __future__ import annotations

import numpy as np
import pytest
from oracle import conv_matrix, conv_transpose_matrix, singular_values

from specprof.engine import operator as operator_module
from specprof.engine.errors import BackendError, InputShapeError
from specprof.engine.operator import (
    ConvApply,
    dense_operator,
    operator_shape,
    output_spatial_shape,
    sparse_operator,
)
from specprof.engine.plugins import Registry, get_plugin_manager
from specprof.engine.types import Layer, Request
from specprof.plugins.backends.exact import ExactBackend

RNG_SEED = 20240611


def _weight(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(RNG_SEED + seed).standard_normal(shape)


def _asymmetric_reference(weight: np.ndarray, input_shape: tuple[int, ...],
                          pads: tuple[int, ...], **kwargs) -> np.ndarray:
    """Oracle for asymmetric ONNX pads: a valid torch conv on the explicitly padded input,
    restricted to the columns of the real (unpadded) input positions."""
    d = len(input_shape) - 1
    begin, end = pads[:d], pads[d:]
    padded = (input_shape[0], *(n + b + e for n, b, e in zip(input_shape[1:], begin, end, strict=True)))
    full = conv_matrix(weight, padded, padding=0, **kwargs)
    mask = np.zeros(padded, dtype=bool)
    mask[(slice(None), *(slice(b, b + n) for b, n in zip(begin, input_shape[1:], strict=True)))] = True
    return full[:, mask.ravel()]


# (id, layer, oracle matrix, boundary): every case builds the layer the ONNX way and the oracle the torch way.
def _cases() -> list[tuple[str, Layer, np.ndarray, str]]:
    cases = []

    def conv(case_id, weight, input_shape, *, stride=1, padding=0, dilation=1, groups=1,
             circular=False, pads=None):
        d = weight.ndim - 2
        st = (stride,) * d if isinstance(stride, int) else stride
        dl = (dilation,) * d if isinstance(dilation, int) else dilation
        if pads is None:
            p = (padding,) * d if isinstance(padding, int) else padding
            pads = (*p, *p)
            ref = conv_matrix(weight, input_shape, stride=st, padding=p, dilation=dl,
                              groups=groups, circular=circular)
        else:
            ref = _asymmetric_reference(weight, input_shape, pads, stride=st, dilation=dl,
                                        groups=groups)
        layer = Layer(name=case_id, op_type="Conv", weight=weight, strides=st, pads=pads,
                      dilations=dl, groups=groups, input_shape=input_shape)
        cases.append((case_id, layer, ref, "circular" if circular else "zeros"))

    def convt(case_id, weight, input_shape, *, stride=1, padding=0, output_padding=0,
              dilation=1, groups=1):
        d = weight.ndim - 2
        st = (stride,) * d if isinstance(stride, int) else stride
        p = (padding,) * d if isinstance(padding, int) else padding
        op = (output_padding,) * d if isinstance(output_padding, int) else output_padding
        dl = (dilation,) * d if isinstance(dilation, int) else dilation
        ref = conv_transpose_matrix(weight, input_shape, stride=st, padding=p,
                                    output_padding=op, dilation=dl, groups=groups)
        layer = Layer(name=case_id, op_type="ConvTranspose", weight=weight, strides=st,
                      pads=(*p, *p), output_padding=op, dilations=dl, groups=groups,
                      input_shape=input_shape)
        cases.append((case_id, layer, ref, "zeros"))

    def convt_circular(case_id, weight, input_shape, *, stride=1, dilation=1, groups=1):
        # The adjoint of the circular conv (same weight, Conv layout c_out_T -> c_in_T) on the
        # n*s grid.
        d = weight.ndim - 2
        st = (stride,) * d if isinstance(stride, int) else stride
        dl = (dilation,) * d if isinstance(dilation, int) else dilation
        c_out = weight.shape[1] * groups
        grid = (c_out, *(n * s for n, s in zip(input_shape[1:], st, strict=True)))
        ref = conv_matrix(weight, grid, stride=st, dilation=dl, groups=groups, circular=True).T
        layer = Layer(name=case_id, op_type="ConvTranspose", weight=weight, strides=st,
                      dilations=dl, groups=groups, pads=(1,) * (2 * d), input_shape=input_shape)
        cases.append((case_id, layer, ref, "circular"))

    conv("conv1d-same", _weight(4, 3, 3), (3, 9), padding=1)
    conv("conv1d-stride2-asym-pads", _weight(4, 3, 3, seed=1), (3, 10), stride=2, pads=(0, 2))
    conv("conv2d-same", _weight(5, 3, 3, 3, seed=2), (3, 6, 5), padding=1)
    conv("conv2d-stride(2,1)", _weight(4, 3, 3, 3, seed=3), (3, 7, 6), stride=(2, 1), padding=1)
    conv("conv2d-asym-pads", _weight(4, 2, 3, 2, seed=4), (2, 5, 6), pads=(1, 0, 0, 2))
    conv("conv2d-dilation2", _weight(3, 2, 3, 3, seed=5), (2, 7, 7), dilation=2, padding=2)
    conv("conv2d-groups2", _weight(6, 2, 3, 3, seed=6), (4, 5, 5), groups=2, padding=1)
    conv("conv2d-depthwise-stride2", _weight(4, 1, 3, 3, seed=7), (4, 8, 7), groups=4,
         stride=2, padding=1)
    conv("conv2d-5x5-valid", _weight(2, 3, 5, 5, seed=8), (3, 7, 6))
    conv("conv3d", _weight(3, 2, 3, 2, 3, seed=9), (2, 4, 3, 5), padding=(1, 0, 1),
         stride=(1, 2, 1))
    conv("circ-conv1d", _weight(3, 2, 3, seed=10), (2, 7), circular=True)
    conv("circ-conv2d", _weight(4, 3, 3, 3, seed=11), (3, 5, 4), circular=True)
    conv("circ-conv2d-stride2-odd-n", _weight(4, 3, 3, 3, seed=12), (3, 5, 6), stride=2,
         circular=True)
    conv("circ-conv2d-kernel-larger-than-input", _weight(3, 2, 4, 4, seed=13), (2, 3, 3),
         circular=True)
    conv("circ-conv2d-dilation-groups", _weight(4, 1, 3, 3, seed=14), (2, 6, 5), dilation=2,
         groups=2, circular=True)
    conv("circ-conv3d", _weight(2, 2, 3, 3, 3, seed=15), (2, 3, 4, 3), circular=True)
    convt("convT1d-stride2", _weight(3, 4, 3, seed=16), (3, 6), stride=2, padding=1,
          output_padding=1)
    convt("convT2d-stride2-pad", _weight(4, 3, 3, 3, seed=17), (4, 4, 3), stride=2, padding=1,
          output_padding=1)
    convt("convT2d-groups-dilation", _weight(4, 2, 3, 2, seed=18), (4, 3, 4), stride=(2, 1),
          padding=(1, 0), output_padding=(1, 0), dilation=(1, 2), groups=2)
    convt("convT2d-depthwise", _weight(3, 1, 2, 2, seed=19), (3, 4, 4), stride=2, groups=3)
    convt("convT3d", _weight(2, 3, 2, 2, 2, seed=20), (2, 3, 2, 3), stride=(2, 1, 2))
    convt_circular("circ-convT2d-stride2", _weight(3, 2, 3, 3, seed=21), (3, 3, 4), stride=2)
    convt_circular("circ-convT1d-groups-dilation", _weight(4, 1, 3, seed=22), (4, 5), stride=2,
                   dilation=2, groups=2)
    return cases


CASES = _cases()
IDS = [case[0] for case in CASES]
BY_ID = {case[0]: case for case in CASES}


def _assert_spectra_close(values: np.ndarray, reference: np.ndarray, rtol: float) -> None:
    """Each singular value within ``rtol`` of the reference, relative to itself or, for values
    at rounding level, to sigma_max (no SVD resolves those more finely)."""
    reference = np.sort(reference)[::-1]
    assert values.shape == reference.shape
    np.testing.assert_allclose(values, reference, rtol=rtol, atol=rtol * reference[0])


@pytest.mark.parametrize(("case_id", "layer", "reference", "boundary"), CASES, ids=IDS)
def test_dense_operator_matches_torch(case_id, layer, reference, boundary):
    """The zero-padded operator is torch's matrix entry for entry; the circular one equals the
    oracle up to the circular shift the pads cause, so only its spectrum is compared below."""
    assert operator_shape(layer, boundary) == reference.shape
    if boundary == "zeros":
        np.testing.assert_allclose(dense_operator(layer, boundary), reference, rtol=0,
                                   atol=1e-13)


@pytest.mark.parametrize(("case_id", "layer", "reference", "boundary"), CASES, ids=IDS)
def test_exact_singular_values(case_id, layer, reference, boundary):
    request = Request(boundary=boundary)
    backend = ExactBackend()
    assert backend.supports(layer, request)
    spectrum = backend.compute(layer, request)
    _assert_spectra_close(spectrum.values, singular_values(reference), rtol=1e-10)
    assert spectrum.kind == "operator" and spectrum.backend == "exact" and spectrum.exact
    assert spectrum.boundary == boundary
    assert spectrum.params == request.params()
    assert spectrum.seconds > 0 and spectrum.device == "cpu"


@pytest.mark.parametrize(("case_id", "layer", "reference", "boundary"), CASES, ids=IDS)
def test_matrix_free_apply_and_adjoint(case_id, layer, reference, boundary, monkeypatch):
    # A tiny im2col budget forces the chunked loop over output positions.
    monkeypatch.setattr(operator_module, "_CHUNK_BYTES", 64)
    apply = ConvApply(layer, boundary)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(reference.shape[1])
    y = rng.standard_normal(reference.shape[0])
    ax, aty = apply.matvec(x), apply.rmatvec(y)
    assert abs(ax @ y - x @ aty) <= 1e-12 * np.linalg.norm(ax) * np.linalg.norm(y)
    if boundary == "zeros":
        np.testing.assert_allclose(ax, reference @ x, rtol=0, atol=1e-12 * np.abs(reference @ x).max())
        np.testing.assert_allclose(aty, reference.T @ y, rtol=0,
                                   atol=1e-12 * np.abs(reference.T @ y).max())


def test_sparse_operator_sums_wrapped_taps():
    """A 4-tap kernel on a 3-point circular input hits one input twice: entries are summed."""
    weight = np.arange(1.0, 5.0).reshape(1, 1, 4)
    reference = conv_matrix(weight, (1, 3), circular=True)
    layer = Layer(name="wrap", op_type="Conv", weight=weight, input_shape=(1, 3))
    matrix = sparse_operator(layer, "circular").toarray()
    # Output 0 reads inputs 0, 1, 2, 0 with taps 1, 2, 3, 4.
    np.testing.assert_array_equal(matrix[0], [1 + 4, 2, 3])
    np.testing.assert_array_equal(matrix, reference)


@pytest.mark.parametrize("case_id", [
    "conv2d-same", "conv2d-stride(2,1)", "circ-conv2d-stride2-odd-n",
    "circ-conv2d-kernel-larger-than-input", "convT2d-stride2-pad", "convT2d-groups-dilation",
    "circ-convT2d-stride2",
])
def test_top_k_matches_dense_oracle(case_id):
    _, layer, reference, boundary = BY_ID[case_id]
    k = 4
    request = Request(boundary=boundary, top_k=k)
    spectrum = ExactBackend().compute(layer, request)
    assert spectrum.values.shape == (k,)
    assert "matrix-free" in spectrum.note
    expected = np.sort(singular_values(reference))[::-1][:k]
    np.testing.assert_allclose(spectrum.values, expected, rtol=1e-8)


def test_top_k_near_full_rank_falls_back_to_dense():
    _, layer, reference, _ = BY_ID["conv1d-same"]
    k = min(reference.shape) - 1
    spectrum = ExactBackend().compute(layer, Request(top_k=k))
    assert "densely" in spectrum.note
    _assert_spectra_close(spectrum.values, singular_values(reference), rtol=1e-10)


def test_top_k_supported_above_dense_limit():
    layer = Layer(name="big", op_type="Conv", weight=_weight(8, 8, 3, 3),
                  pads=(1, 1, 1, 1), input_shape=(8, 32, 32))
    backend = ExactBackend()
    refused = backend.supports(layer, Request(max_dense=1024))
    assert not refused
    assert "--top-k" in refused.reason and "fft-circulant" in refused.reason
    assert backend.supports(layer, Request(max_dense=1024, top_k=3))


def test_refuses_dense_matrix_over_memory_limit():
    layer = Layer(name="wide", op_type="Conv", weight=_weight(64, 1, 3, 3),
                  pads=(1, 1, 1, 1), input_shape=(1, 200, 200))
    support = ExactBackend().supports(layer, Request(max_dense=10**6))
    assert not support
    assert "GiB" in support.reason and "--top-k" in support.reason


def test_refuses_without_input_shape():
    layer = Layer(name="noshape", op_type="Conv", weight=_weight(2, 2, 3, 3))
    support = ExactBackend().supports(layer, Request())
    assert not support and "--input-shape" in support.reason
    with pytest.raises(InputShapeError):
        dense_operator(layer)


def test_refuses_input_too_small_and_wrong_channels():
    small = Layer(name="small", op_type="Conv", weight=_weight(2, 2, 5, 5), input_shape=(2, 3, 3))
    assert not ExactBackend().supports(small, Request())
    assert ExactBackend().supports(small, Request(boundary="circular"))
    wrong = Layer(name="wrong", op_type="Conv", weight=_weight(2, 2, 3, 3), input_shape=(3, 5, 5))
    support = ExactBackend().supports(wrong, Request())
    assert not support and "channels" in support.reason


def test_output_spatial_shape_formulas():
    layer = Layer(name="s", op_type="Conv", weight=_weight(1, 1, 3, 3), strides=(2, 3),
                  pads=(1, 0, 1, 2), input_shape=(1, 9, 10))
    assert output_spatial_shape(layer, "zeros") == ((9 + 2 - 2 - 1) // 2 + 1, (10 + 2 - 2 - 1) // 3 + 1)
    assert output_spatial_shape(layer, "circular") == (5, 4)


@pytest.mark.parametrize("op_type", ["Gemm", "MatMul"])
def test_matrix_layers(op_type):
    weight = _weight(7, 12, seed=30)
    layer = Layer(name="fc", op_type=op_type, weight=weight, input_shape=(12,))
    backend = ExactBackend()
    support = backend.supports(layer, Request())
    assert support and "matrix" in support.reason
    spectrum = backend.compute(layer, Request())
    _assert_spectra_close(spectrum.values, np.linalg.svd(weight, compute_uv=False), rtol=1e-12)
    assert spectrum.boundary is None
    top = backend.compute(layer, Request(top_k=3))
    np.testing.assert_allclose(top.values, spectrum.values[:3], rtol=1e-8)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_raise(bad):
    weight = _weight(2, 2, 3, 3)
    weight[0, 1, 2, 0] = bad
    layer = Layer(name="broken", op_type="Conv", weight=weight, input_shape=(2, 4, 4))
    with pytest.raises(BackendError, match="non-finite weights") as info:
        ExactBackend().compute(layer, Request())
    assert "broken" in info.value.message and info.value.hint


def test_float32_precision():
    _, layer, reference, boundary = BY_ID["conv2d-same"]
    spectrum = ExactBackend().compute(layer, Request(boundary=boundary, precision="float32"))
    _assert_spectra_close(spectrum.values, singular_values(reference), rtol=1e-5)
    top = ExactBackend().compute(layer, Request(boundary=boundary, precision="float32", top_k=3))
    np.testing.assert_allclose(top.values, np.sort(singular_values(reference))[::-1][:3],
                               rtol=1e-5)


def test_torch_svd_path_agrees():
    _, layer, reference, boundary = BY_ID["conv2d-groups2"]
    backend = ExactBackend(_torch_device="cpu")
    spectrum = backend.compute(layer, Request(boundary=boundary))
    _assert_spectra_close(spectrum.values, singular_values(reference), rtol=1e-10)


def test_cuda_request_without_cuda_is_refused_with_reason():
    import torch

    _, layer, _, _ = BY_ID["conv1d-same"]
    support = ExactBackend().supports(layer, Request(device="cuda"))
    if torch.cuda.is_available():
        assert support
    else:
        assert not support and "CUDA" in support.reason


def test_default_selection_picks_exact_or_none():
    modules = ("specprof.plugins.backends.exact", "specprof.plugins.backends.filter",
               "specprof.plugins.backends.selection")
    pm = get_plugin_manager(default_plugins=modules, entry_points=False)
    registry = Registry.from_manager(pm)
    assert {"exact", "filter"} <= set(registry.backends)
    backends = registry.available_backends()
    _, small, _, _ = BY_ID["conv2d-same"]
    name, reason = pm.hook.specprof_select_backend(layer=small, request=Request(),
                                                   backends=backends)
    assert name == "exact" and "cheapest exact" in reason
    fc = Layer(name="fc", op_type="Gemm", weight=_weight(3, 4), input_shape=(4,))
    assert pm.hook.specprof_select_backend(layer=fc, request=Request(),
                                           backends=backends)[0] == "exact"
    too_big = Request(max_dense=10)
    assert pm.hook.specprof_select_backend(layer=small, request=too_big,
                                           backends=backends) is None
    assert pm.hook.specprof_select_backend(layer=small, request=Request(),
                                           backends={}) is None
