"""Normalization and extraction of layers from small ONNX models built in tests/models.py.

Independent oracles: onnxruntime runs the models (pads, output sizes and Gemm/MatMul matrices
are checked against what it computes), and torch's convolutions check auto_pad resolution.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from models import seeded, single_op, small_cnn, two_activation_matmul
from onnx import TensorProto, helper, numpy_helper

from specprof.engine.errors import InputShapeError, ModelLoadError
from specprof.engine.extract import extract_layers
from specprof.engine.normalize import TARGET_OPSET, normalize
from specprof.engine.types import Layer


def _layers(model: onnx.ModelProto, input_shape=None) -> tuple[list[Layer], list]:
    normalized, _ = normalize(model, input_shape)
    return extract_layers(normalized)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _same(a: Layer, b: Layer) -> bool:
    return a.content_hash == b.content_hash and a.name == b.name and a.op_type == b.op_type


# --- the small CNN: every attribute as built -------------------------------------------------

def test_small_cnn_layers_match_what_was_built():
    layers, skipped = _layers(small_cnn())
    assert skipped == []
    conv1, conv2, fc = layers
    assert [layer.index for layer in layers] == [0, 1, 2]
    assert (conv1.name, conv1.op_type, conv1.node_name) == ("conv1", "Conv", "conv1")
    np.testing.assert_array_equal(conv1.weight, seeded((4, 3, 3, 3), 1))
    np.testing.assert_array_equal(conv1.bias, seeded((4,), 2))
    assert conv1.pads == (1, 1, 1, 1) and conv1.strides == (1, 1) and conv1.groups == 1
    assert conv1.input_shape == (3, 8, 8) and conv1.output_shape == (4, 8, 8)
    np.testing.assert_array_equal(conv2.weight, seeded((4, 2, 3, 3), 3))
    assert conv2.strides == (2, 2) and conv2.groups == 2 and conv2.pads == (1, 1, 1, 1)
    assert conv2.input_shape == (4, 8, 8) and conv2.output_shape == (4, 4, 4)
    # transB=1: the stored (5, 64) matrix is already the map's (out, in) matrix.
    np.testing.assert_array_equal(fc.weight, seeded((5, 64), 5))
    np.testing.assert_array_equal(fc.bias, seeded((5,), 6))
    assert fc.op_type == "Gemm" and fc.input_shape == (64,) and fc.output_shape == (5,)


@pytest.mark.parametrize("weights_as", ["constant", "identity"])
def test_constant_and_identity_weights_equal_initializers(weights_as):
    reference, _ = _layers(small_cnn("initializer"))
    layers, skipped = _layers(small_cnn(weights_as))
    assert skipped == []
    assert len(layers) == len(reference) == 3
    assert all(_same(a, b) for a, b in zip(layers, reference, strict=True))


def test_old_opset_is_converted_and_gives_the_same_layers():
    normalized, warnings = normalize(small_cnn(opset=13))
    assert warnings == []
    assert [o.version for o in normalized.opset_import if o.domain == ""] == [TARGET_OPSET]
    layers, _ = extract_layers(normalized)
    reference, _ = _layers(small_cnn())
    assert all(_same(a, b) for a, b in zip(layers, reference, strict=True))


def test_failed_opset_conversion_keeps_the_model_with_a_warning(monkeypatch):
    def refuse(model, target):
        raise RuntimeError("no adapter for this op")

    monkeypatch.setattr("specprof.engine.normalize.version_converter.convert_version", refuse)
    normalized, warnings = normalize(small_cnn(opset=13))
    assert len(warnings) == 1 and "kept opset 13" in warnings[0] and "no adapter" in warnings[0]
    assert [o.version for o in normalized.opset_import if o.domain == ""] == [13]
    layers, _ = extract_layers(normalized)
    reference, _ = _layers(small_cnn())
    assert all(_same(a, b) for a, b in zip(layers, reference, strict=True))


def test_normalize_does_not_modify_its_input():
    model = small_cnn(batch="N", spatial=("H", "W"))
    before = model.SerializeToString()
    normalize(model, (3, 8, 8))
    assert model.SerializeToString() == before


# --- convolutions in 1, 2 and 3 dimensions ---------------------------------------------------

CONV_CASES = [
    ("Conv", (6, 2, 3), (1, 4, 11), dict(strides=[2], pads=[1, 2], dilations=[2], group=2)),
    ("Conv", (4, 3, 2, 3), (1, 3, 7, 9), dict(strides=[1, 2], pads=[0, 1, 1, 0], dilations=[2, 1])),
    ("Conv", (2, 2, 2, 2, 2), (1, 2, 4, 5, 6), dict(strides=[1, 2, 1], pads=[1, 0, 0, 0, 1, 1])),
    ("ConvTranspose", (4, 3, 3, 3), (1, 4, 5, 5),
     dict(strides=[2, 2], pads=[1, 0, 1, 0], output_padding=[1, 0], group=1)),
    ("ConvTranspose", (4, 2, 3), (1, 4, 6), dict(strides=[3], pads=[0, 1], dilations=[2], group=2,
                                                    output_padding=[2])),
]


@pytest.mark.parametrize(("op", "wshape", "xshape", "attrs"), CONV_CASES)
def test_conv_attributes_and_shapes(op, wshape, xshape, attrs):
    weight = seeded(wshape, 7)
    bias_size = wshape[0] if op == "Conv" else wshape[1] * attrs.get("group", 1)
    model = single_op(op, weight, xshape, bias=seeded((bias_size,), 8), **attrs)
    (layer,), skipped = _layers(model)
    assert skipped == []
    d = len(wshape) - 2
    assert layer.op_type == op and layer.spatial_dims == d
    np.testing.assert_array_equal(layer.weight, weight)
    assert layer.strides == tuple(attrs.get("strides", [1] * d))
    assert layer.pads == tuple(attrs["pads"])
    assert layer.dilations == tuple(attrs.get("dilations", [1] * d))
    assert layer.groups == attrs.get("group", 1)
    assert layer.output_padding == tuple(attrs.get("output_padding", [0] * d))
    assert layer.input_shape == tuple(xshape[1:])
    actual = _run(model, seeded(xshape, 9))
    assert layer.output_shape == actual.shape[1:]


def _torch_conv(layer: Layer, x: np.ndarray) -> np.ndarray:
    """torch's conv2d with the layer's explicit (possibly asymmetric) pads."""
    top, left, bottom, right = layer.pads
    padded = F.pad(torch.from_numpy(x), (left, right, top, bottom))
    out = F.conv2d(padded, torch.tensor(layer.weight), stride=layer.strides,
                   dilation=layer.dilations, groups=layer.groups)
    return out.numpy()


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize(("kernel", "stride", "dilation", "n"),
                         [(3, 1, 1, 7), (4, 1, 1, 8), (4, 2, 1, 7), (3, 2, 1, 8), (2, 3, 1, 10)])
def test_auto_pad_resolves_to_the_pads_onnxruntime_uses(auto_pad, kernel, stride, dilation, n):
    # onnxruntime refuses dilation with SAME_*; the torch 'same' test below covers dilation.
    weight = seeded((3, 2, kernel, kernel), 11)
    model = single_op("Conv", weight, (1, 2, n, n), auto_pad=auto_pad, strides=[stride, stride],
                      dilations=[dilation, dilation])
    (layer,), _ = _layers(model)
    x = seeded((1, 2, n, n), 12)
    expected = _run(model, x)
    np.testing.assert_allclose(_torch_conv(layer, x), expected, rtol=1e-5, atol=1e-5)
    assert layer.output_shape == expected.shape[1:]


@pytest.mark.parametrize("kernel", [3, 4, 5])
def test_same_upper_matches_torch_same_padding(kernel):
    weight = seeded((2, 2, kernel, kernel), 13)
    (layer,), _ = _layers(single_op("Conv", weight, (1, 2, 9, 9), auto_pad="SAME_UPPER",
                                    dilations=[2, 2]))
    x = seeded((1, 2, 9, 9), 14)
    same = F.conv2d(torch.from_numpy(x), torch.from_numpy(weight), padding="same", dilation=2)
    assert layer.output_shape == tuple(same.shape[1:])
    np.testing.assert_allclose(_torch_conv(layer, x), same.numpy(), rtol=1e-5, atol=1e-5)


def test_auto_pad_without_input_size_is_skipped_with_the_reason():
    model = single_op("Conv", seeded((2, 2, 3, 3)), ("N", 2, "H", "W"), auto_pad="SAME_UPPER")
    layers, skipped = _layers(model)
    assert layers == []
    assert skipped[0].op_type == "Conv" and "--input-shape" in skipped[0].reason
    (layer,), _ = _layers(model, (2, 6, 6))
    assert layer.pads == (1, 1, 1, 1) and layer.input_shape == (2, 6, 6)


def _torch_conv_transpose(layer: Layer, x: np.ndarray) -> np.ndarray:
    """Full transposed convolution (no padding), then cropped by the layer's begin/end pads."""
    full = F.conv_transpose2d(torch.from_numpy(x), torch.tensor(layer.weight),
                              stride=layer.strides, dilation=layer.dilations, groups=layer.groups,
                              output_padding=layer.output_padding).numpy()
    top, left, bottom, right = layer.pads
    return full[:, :, top:full.shape[2] - bottom, left:full.shape[3] - right]


@pytest.mark.parametrize(("attrs", "n"), [
    (dict(strides=[2, 2], output_shape=[9, 10]), 5),
    (dict(strides=[2, 2], output_shape=[10, 10], output_padding=[1, 0]), 5),
    (dict(strides=[2, 2], auto_pad="SAME_UPPER"), 5),
    (dict(strides=[3, 3], auto_pad="SAME_LOWER", output_padding=[1, 1]), 4),
])
def test_conv_transpose_output_shape_becomes_explicit_pads(attrs, n):
    weight = seeded((3, 2, 4, 4), 15)
    model = single_op("ConvTranspose", weight, (1, 3, n, n), **attrs)
    (layer,), skipped = _layers(model)
    assert skipped == []
    x = seeded((1, 3, n, n), 16)
    expected = _run(model, x)
    np.testing.assert_allclose(_torch_conv_transpose(layer, x), expected, rtol=1e-5, atol=1e-5)
    assert layer.output_shape == expected.shape[1:]


def test_conv_transpose_output_shape_too_large_is_skipped():
    model = single_op("ConvTranspose", seeded((3, 2, 3, 3)), (1, 3, 4, 4), strides=[1, 1],
                      output_shape=[9, 9])
    normalized, _ = normalize(model)
    layers, skipped = extract_layers(normalized)
    assert layers == [] and "larger than the full transposed convolution" in skipped[0].reason


def test_conv_with_a_computed_weight_is_skipped():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="dynamic_conv")]
    graph = helper.make_graph(nodes, "g", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5]),
        helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2, 3, 3]),
    ], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    layers, skipped = _layers(model)
    assert layers == []
    assert skipped[0].name == "dynamic_conv" and "weight is not a constant" in skipped[0].reason


# --- Gemm and MatMul: the (out, in) matrix, checked on basis vectors with onnxruntime ---------

def _matrix_by_onnxruntime(model: onnx.ModelProto, k: int, samples_are_rows: bool) -> np.ndarray:
    """The map's matrix: (Y(I) - Y(0)) holds M e_i in its rows or columns."""
    eye, zero = np.eye(k, dtype=np.float32), np.zeros((k, k), dtype=np.float32)
    diff = _run(model, eye) - _run(model, zero)
    return diff.T if samples_are_rows else diff


@pytest.mark.parametrize(("trans_a", "trans_b", "alpha"),
                         [(0, 0, 1.0), (0, 1, 1.0), (0, 1, 0.5), (1, 0, -2.0), (1, 1, 3.0)])
def test_gemm_weight_is_the_normalized_matrix(trans_a, trans_b, alpha):
    k, m = 6, 4
    weight = seeded((m, k) if trans_b else (k, m), 17)
    bias = seeded((m,), 18)
    model = single_op("Gemm", weight, (k, k), bias=bias, transA=trans_a, transB=trans_b,
                      alpha=alpha, beta=0.5)
    (layer,), _ = _layers(model)
    expected = _matrix_by_onnxruntime(model, k, samples_are_rows=True)
    np.testing.assert_allclose(layer.weight, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.bias, _run(model, np.zeros((k, k), np.float32))[0], rtol=1e-6)
    assert layer.input_shape == (k,) and layer.output_shape == (m,)


@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm_with_a_constant_first_operand(trans_a):
    k, m = 5, 3
    weight = seeded((k, m) if trans_a else (m, k), 19)
    model = single_op("Gemm", weight, (k, k), weight_first=True, transA=trans_a, alpha=2.0)
    (layer,), _ = _layers(model)
    expected = _matrix_by_onnxruntime(model, k, samples_are_rows=False)
    np.testing.assert_allclose(layer.weight, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_first", [False, True])
def test_matmul_weight_is_the_normalized_matrix(weight_first):
    k, m = 6, 4
    weight = seeded((m, k) if weight_first else (k, m), 20)
    model = single_op("MatMul", weight, (k, k), weight_first=weight_first)
    (layer,), skipped = _layers(model)
    assert skipped == [] and layer.op_type == "MatMul" and layer.bias is None
    expected = _matrix_by_onnxruntime(model, k, samples_are_rows=not weight_first)
    np.testing.assert_allclose(layer.weight, expected, rtol=1e-5, atol=1e-5)


def test_matmul_of_two_activations_is_skipped_with_the_reason():
    layers, skipped = _layers(two_activation_matmul())
    assert layers == []
    assert [(s.name, s.op_type) for s in skipped] == [("attention", "MatMul")]
    assert "both operands are activations" in skipped[0].reason


def test_unnamed_node_is_named_by_its_output():
    model = single_op("MatMul", seeded((6, 4)), (2, 6))
    model.graph.node[0].name = ""
    (layer,), _ = _layers(model)
    assert layer.name == "y" and layer.node_name == ""


# --- weights behind constant chains, and their dtypes -----------------------------------------

def test_weight_through_cast_reshape_and_transpose_chain():
    weight = seeded((3, 4, 3, 3), 21)
    stored = weight.reshape(3, 36).T.astype(np.float16)  # (36, 3) half precision
    nodes = [
        helper.make_node("Constant", [], ["raw"], value=numpy_helper.from_array(stored, "raw")),
        helper.make_node("Transpose", ["raw"], ["t"], perm=[1, 0]),
        helper.make_node("Cast", ["t"], ["c"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["c", "shape"], ["w"]),
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    # Reshape's 0 copies the input's dim (3): (3, 36) -> (3, 4, 3, 3).
    shape = numpy_helper.from_array(np.array([0, 4, 3, -1], dtype=np.int64), "shape")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [1, 4, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    (layer,), _ = _layers(model)
    np.testing.assert_array_equal(layer.weight, weight.astype(np.float16).astype(np.float32))
    x = seeded((1, 4, 5, 5), 22)
    np.testing.assert_allclose(_torch_conv(layer, x), _run(model, x), rtol=1e-5, atol=1e-5)


def test_float16_weights_become_float32():
    model = single_op("Conv", seeded((2, 2, 3, 3)).astype(np.float16), (1, 2, 5, 5))
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    (layer,), _ = _layers(model)
    assert layer.weight.dtype == np.float32


def test_dequantize_linear_weights_are_resolved():
    q = np.random.default_rng(23).integers(-100, 100, size=(4, 2, 3, 3)).astype(np.int8)
    scale = np.array([0.5, 0.25, 0.1, 1.0], dtype=np.float32)
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "scale"], ["w"], axis=0),
        helper.make_node("Conv", ["x", "w"], ["y"], name="qconv"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [1, 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
                              [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "scale")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    (layer,), _ = _layers(model)
    x = seeded((1, 2, 5, 5), 24)
    np.testing.assert_allclose(_torch_conv(layer, x), _run(model, x), rtol=1e-5, atol=1e-5)


# --- input shapes -----------------------------------------------------------------------------

def test_dynamic_input_gets_shapes_from_input_shape():
    model = small_cnn(batch="N", spatial=("H", "W"))
    layers, _ = _layers(model)
    assert [layer.input_shape for layer in layers[:2]] == [None, None]
    layers, _ = _layers(model, (3, 8, 8))
    assert [layer.input_shape for layer in layers] == [(3, 8, 8), (4, 8, 8), (64,)]
    assert [layer.output_shape for layer in layers] == [(4, 8, 8), (4, 4, 4), (5,)]


def test_input_shape_can_change_the_size_of_a_convolutional_model():
    model = single_op("Conv", seeded((2, 3, 3, 3)), (1, 3, 8, 8), pads=[1, 1, 1, 1])
    (layer,), _ = _layers(model, (3, 20, 12))
    assert layer.input_shape == (3, 20, 12) and layer.output_shape == (2, 20, 12)


@pytest.mark.parametrize(("shape", "words"), [
    ((4, 8, 8), "takes 3"),      # wrong channel count
    ((3, 8), "takes 3 after the batch"),  # wrong rank
    ((3, 16, 16), "cannot take input shape"),  # Flatten -> Gemm(64) cannot take 16x16
])
def test_wrong_input_shape_is_an_input_shape_error(shape, words):
    with pytest.raises(InputShapeError, match=words) as info:
        normalize(small_cnn(batch="N", spatial=("H", "W")), shape)
    assert "--input-shape" in info.value.hint


def test_invalid_model_is_a_model_load_error():
    model = small_cnn()
    model.graph.node[0].input[1] = "nowhere"
    with pytest.raises(ModelLoadError, match="invalid"):
        normalize(model)
