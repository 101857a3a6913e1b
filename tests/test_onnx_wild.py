"""ONNX as other tools write it: quantized ops, half-precision weights, every opset, external
data, fused QKV projections, BatchNorm folding, and ops onnx does not know.

onnxruntime running the model is the oracle wherever it has a kernel: the extracted float
layer, applied with torch, must reproduce what the model computes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from models import seeded, single_op, small_cnn
from onnx import TensorProto, helper, numpy_helper

from specprof.engine.errors import ModelLoadError
from specprof.engine.extract import extract, split_fused
from specprof.engine.loading import load_model
from specprof.engine.normalize import TARGET_OPSET, normalize
from specprof.engine.plugins import Registry, get_plugin_manager
from specprof.engine.types import Layer

IMPORTERS = ("specprof.plugins.importers.onnx_importer",)


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.from_manager(get_plugin_manager(default_plugins=IMPORTERS, entry_points=False))


def _model(nodes, inputs, outputs, initializers, opset=TARGET_OPSET, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def _value(name, dims, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, dims)


def _run(model: onnx.ModelProto, **feeds: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _extract(model: onnx.ModelProto, **options) -> tuple[list[Layer], dict]:
    normalized, _ = normalize(model)
    result = extract(normalized, **options)
    return list(result.layers), dict(result.notes)


def _conv(layer: Layer, x: np.ndarray) -> np.ndarray:
    top, left, bottom, right = layer.pads
    padded = F.pad(torch.from_numpy(x.astype(np.float32)), (left, right, top, bottom))
    bias = None if layer.bias is None else torch.tensor(layer.bias)
    return F.conv2d(padded, torch.tensor(layer.weight), bias, stride=layer.strides,
                    dilation=layer.dilations, groups=layer.groups).numpy()


def _quantize(x: np.ndarray, scale: float, zero: int, dtype=np.uint8) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.clip(np.rint(x / scale) + zero, info.min, info.max).astype(dtype)


def _int8(shape, seed) -> np.ndarray:
    return np.random.default_rng(seed).integers(-60, 60, size=shape).astype(np.int8)


# --- quantized ops ----------------------------------------------------------------------------

@pytest.mark.parametrize("per_channel", [False, True])
def test_qlinear_conv_is_the_float_conv_of_the_dequantized_weight(per_channel):
    w = _int8((4, 3, 3, 3), 1)
    w_scale = (np.array([0.02, 0.05, 0.01, 0.03], np.float32) if per_channel
               else np.array(0.02, np.float32))
    w_zero = np.zeros(4 if per_channel else (), np.int8)
    x_scale, x_zero, y_scale, y_zero = np.float32(0.05), np.uint8(120), np.float32(0.1), np.uint8(128)
    bias = np.array([100, -200, 50, 0], np.int32)
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"],
                            ["y"], name="qconv", pads=[1, 1, 1, 1])
    model = _model([node], [_value("x", [1, 3, 6, 6], TensorProto.UINT8)],
                   [_value("y", [1, 4, 6, 6], TensorProto.UINT8)],
                   dict(xs=x_scale, xz=x_zero, w=w, ws=w_scale, wz=w_zero, ys=y_scale, yz=y_zero, b=bias))
    (layer,), notes = _extract(model)
    assert layer.op_type == "Conv" and "dequantized" in notes["qconv"][0]
    per_axis = w_scale.reshape(-1, 1, 1, 1) if per_channel else w_scale
    np.testing.assert_allclose(layer.weight, w.astype(np.float32) * per_axis, rtol=1e-6)
    xq = np.random.default_rng(2).integers(0, 255, size=(1, 3, 6, 6)).astype(np.uint8)
    (expected,) = _run(model, x=xq)
    ours = _quantize(_conv(layer, (xq.astype(np.float32) - x_zero) * x_scale), y_scale, y_zero)
    # Only the rounding of the output may differ (float vs onnxruntime's fixed point).
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1
    assert (ours == expected).mean() > 0.95


@pytest.mark.parametrize("per_column", [False, True])
def test_qlinear_matmul_is_the_float_matmul_of_the_dequantized_weight(per_column):
    b = _int8((6, 5), 3)
    b_scale = (np.linspace(0.01, 0.05, 5).astype(np.float32) if per_column
               else np.array(0.03, np.float32))
    b_zero = np.zeros(5 if per_column else (), np.int8)
    a_scale, a_zero, y_scale, y_zero = np.float32(0.04), np.uint8(128), np.float32(0.2), np.uint8(100)
    node = helper.make_node("QLinearMatMul", ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], ["y"],
                            name="qmm")
    model = _model([node], [_value("a", [2, 6], TensorProto.UINT8)],
                   [_value("y", [2, 5], TensorProto.UINT8)],
                   {"as": a_scale, "az": a_zero, "b": b, "bs": b_scale, "bz": b_zero,
                    "ys": y_scale, "yz": y_zero}, opset=21)
    (layer,), notes = _extract(model)
    assert layer.op_type == "MatMul" and "qmm" in notes
    np.testing.assert_allclose(layer.weight, (b.astype(np.float32) * b_scale).T, rtol=1e-6)
    aq = np.random.default_rng(4).integers(0, 255, size=(2, 6)).astype(np.uint8)
    (expected,) = _run(model, a=aq)
    ours = _quantize(((aq.astype(np.float32) - a_zero) * a_scale) @ layer.weight.T, y_scale, y_zero)
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1


def test_conv_integer_without_a_scale_is_in_integer_units():
    w, w_zero = _int8((2, 3, 3, 3), 5).astype(np.uint8) + 60, np.uint8(60)
    node = helper.make_node("ConvInteger", ["x", "w", "xz", "wz"], ["y"], name="cint")
    model = _model([node], [_value("x", [1, 3, 5, 5], TensorProto.UINT8)],
                   [_value("y", [1, 2, 3, 3], TensorProto.INT32)],
                   dict(w=w, xz=np.uint8(10), wz=w_zero))
    (layer,), notes = _extract(model)
    np.testing.assert_array_equal(layer.weight, w.astype(np.float32) - 60)
    assert "integer units" in notes["cint"][0]
    xq = np.random.default_rng(6).integers(0, 30, size=(1, 3, 5, 5)).astype(np.uint8)
    (expected,) = _run(model, x=xq)
    np.testing.assert_array_equal(_conv(layer, xq.astype(np.float32) - 10), expected)


def test_dynamically_quantized_model_gives_dequantized_weights(tmp_path):
    """onnxruntime's quantize_dynamic writes ConvInteger/MatMulInteger + Cast + Mul(scale)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    conv_w, fc_w = seeded((4, 3, 3, 3), 7), seeded((64, 6), 8)
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("MatMul", ["f", "fw"], ["y"], name="fc")]
    model = _model(nodes, [_value("x", [1, 3, 4, 4])], [_value("y", [1, 6])], dict(cw=conv_w, fw=fc_w))
    onnx.save(model, tmp_path / "float.onnx")
    quantize_dynamic(tmp_path / "float.onnx", tmp_path / "q.onnx", weight_type=QuantType.QInt8,
                     per_channel=True, op_types_to_quantize=["Conv", "MatMul"])
    quantized = onnx.load(tmp_path / "q.onnx")
    assert {"ConvInteger", "MatMulInteger"} <= {n.op_type for n in quantized.graph.node}
    conv, fc = _extract(quantized)[0]
    # Each weight is within half a quantization step of the float weight it came from.
    step = np.abs(conv_w).max() / 127
    assert np.abs(conv.weight - conv_w).max() <= step / 2 + 1e-6
    steps = np.abs(fc_w).max(axis=0) / 127  # per column of the (64, 6) weight
    assert (np.abs(fc.weight - fc_w.T).max(axis=1) <= steps / 2 + 1e-6).all()
    # And the float layers reproduce the quantized model up to the activations' quantization.
    x = seeded((1, 3, 4, 4), 9)
    (expected,) = _run(quantized, x=x)
    ours = _conv(conv, x).reshape(1, -1) @ fc.weight.T
    assert np.abs(ours - expected).max() <= 0.03 * np.abs(expected).max()


# --- dtypes and constants ---------------------------------------------------------------------

def test_bfloat16_initializer_behind_a_cast():
    weight = seeded((3, 2, 3, 3), 10)
    tensor = helper.make_tensor("w16", TensorProto.BFLOAT16, weight.shape, weight.ravel())
    nodes = [helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "g", [_value("x", [1, 2, 5, 5])], [_value("y", [1, 3, 3, 3])],
                              [tensor])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", TARGET_OPSET)])
    model.ir_version = 8
    (layer,), _ = _extract(model)
    assert layer.weight.dtype == np.float32
    rounded = numpy_helper.to_array(tensor).astype(np.float32)
    np.testing.assert_array_equal(layer.weight, rounded)
    assert 0 < np.abs(rounded - weight).max() < 1e-2  # really bfloat16, not the float weights
    x = seeded((1, 2, 5, 5), 11)
    np.testing.assert_allclose(_conv(layer, x), _run(model, x=x)[0], rtol=1e-5, atol=1e-5)


def test_bfloat16_weight_used_directly():
    weight = seeded((4, 6), 12)
    tensor = helper.make_tensor("w", TensorProto.BFLOAT16, weight.shape, weight.ravel())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [_value("x", [2, 4], TensorProto.BFLOAT16)],
                              [_value("y", [2, 6], TensorProto.BFLOAT16)], [tensor])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", TARGET_OPSET)])
    (layer,), _ = _extract(model)
    assert layer.weight.dtype == np.float32
    np.testing.assert_array_equal(layer.weight, numpy_helper.to_array(tensor).astype(np.float32).T)


def test_constant_node_value_floats_is_a_weight():
    values = seeded((5,), 13)
    nodes = [helper.make_node("Constant", [], ["w"], value_floats=values.tolist()),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="dot")]
    model = _model(nodes, [_value("x", [3, 5])], [_value("y", [3])], {})
    (layer,), _ = _extract(model)
    x = seeded((3, 5), 14)
    np.testing.assert_allclose(x @ layer.weight.T, _run(model, x=x)[0].reshape(3, 1), rtol=1e-5)


# --- opsets -----------------------------------------------------------------------------------

NEWEST = onnx.defs.onnx_opset_version()


def _conv_gemm(opset: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv", pads=[1, 1, 1, 1],
                              strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1)]
    model = _model(nodes, [_value("x", [1, 3, 6, 6])], [_value("y", [1, 5])],
                   dict(w1=seeded((4, 3, 3, 3), 15), b1=seeded((4,), 16), w2=seeded((5, 36), 17),
                        b2=seeded((5,), 18)), opset=opset)
    model.ir_version = 3 if opset < 8 else 8 if opset <= 18 else 10
    if opset < 8:  # IR 3: every initializer is also a graph input, as old exporters wrote
        model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                                 for t in model.graph.initializer)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("opset", sorted({7, 9, 11, 13, 17, 18, NEWEST}))
def test_every_opset_gives_the_same_layers(opset):
    normalized, warnings = normalize(_conv_gemm(opset))
    layers = extract(normalized).layers
    reference = extract(normalize(_conv_gemm(TARGET_OPSET))[0]).layers
    assert [layer.content_hash for layer in layers] == [layer.content_hash for layer in reference]
    assert [layer.name for layer in layers] == ["conv", "fc"]
    converted = [o.version for o in normalized.opset_import if o.domain == ""] == [TARGET_OPSET]
    # Either converted to the target opset, or kept as it was with a warning that says so.
    assert converted or any(f"kept opset {opset}" in w for w in warnings)


# --- external data, and models over 2 GB --------------------------------------------------------

def test_model_over_the_in_memory_limit_keeps_its_data_on_disk(registry, tmp_path, monkeypatch):
    from specprof.plugins.importers import onnx_importer

    model = small_cnn()
    path = tmp_path / "big.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    size_threshold=0, location="big.data")
    in_memory = load_model(path, registry=registry)
    assert not any("stays in its external files" in w for w in in_memory.warnings)

    monkeypatch.setattr(onnx_importer, "MAX_IN_MEMORY_BYTES", 1024)  # pretend it is > 2 GB
    reads: list[str] = []
    read_bytes = onnx.external_data_helper._read_external_data_bytes

    def counting_read(tensor, base_dir):
        reads.append(tensor.name)
        return read_bytes(tensor, base_dir)

    checked: list[object] = []
    check = onnx.checker.check_model

    def recording_check(model_or_path, *args, **kwargs):
        checked.append(model_or_path)
        return check(model_or_path, *args, **kwargs)

    monkeypatch.setattr(onnx.external_data_helper, "_read_external_data_bytes", counting_read)
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model",
                        lambda *a, **k: pytest.fail("the whole data was loaded into the proto"))
    monkeypatch.setattr(onnx.checker, "check_model", recording_check)
    on_disk = load_model(path, registry=registry)

    assert [layer.content_hash for layer in on_disk.layers] == \
        [layer.content_hash for layer in in_memory.layers]
    assert checked == [str(path)]  # checked from the file, never as an in-memory proto
    assert sorted(reads) == sorted({"w1", "b1", "w2", "b2", "w3", "b3"})  # each read once
    assert on_disk.proto.ByteSize() < 2048  # the data never entered the proto
    assert any("stays in its external files" in w for w in on_disk.warnings)


def test_in_memory_model_over_2gb_names_the_fix(monkeypatch):
    from specprof.engine import normalize as normalize_module

    monkeypatch.setattr(normalize_module, "PROTOBUF_LIMIT", 100)
    with pytest.raises(ModelLoadError, match="over 2 GB") as info:
        normalize(small_cnn())
    assert "save_as_external_data" in info.value.hint


# --- fused QKV --------------------------------------------------------------------------------

@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_qkv_is_one_layer_with_a_note_and_splits_into_q_k_v(with_bias):
    d = 8
    weight, bias = seeded((d, 3 * d), 19), seeded((3 * d,), 20)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["qkv0"], name="attn.qkv")]
    if with_bias:
        nodes.append(helper.make_node("Add", ["qkv0", "b"], ["qkv"]))
    nodes.append(helper.make_node("Split", ["qkv" if with_bias else "qkv0", "sizes"],
                                  ["q", "k", "v"], axis=-1, name="split"))
    init = dict(w=weight, sizes=np.array([d, d, d], np.int64), **({"b": bias} if with_bias else {}))
    model = _model(nodes, [_value("x", [1, 5, d])], [_value(n, [1, 5, d]) for n in "qkv"], init)
    (layer,), notes = _extract(model)
    assert layer.op_type == "MatMul" and layer.weight.shape == (3 * d, d)
    assert "fused QKV projection" in notes["attn.qkv"][0] and "8+8+8" in notes["attn.qkv"][0]
    parts = split_fused(layer, [d, d, d])
    assert [p.name for p in parts] == ["attn.qkv[q]", "attn.qkv[k]", "attn.qkv[v]"]
    x = seeded((1, 5, d), 21)
    outputs = _run(model, x=x)
    for part, expected, offset in zip(parts, outputs, (0, d, 2 * d), strict=True):
        shift = bias[offset:offset + d] if with_bias else 0
        np.testing.assert_allclose(x @ part.weight.T + shift, expected, rtol=1e-5, atol=1e-5)


def test_split_fused_refuses_sizes_that_do_not_add_up():
    (layer,), _ = _extract(single_op("MatMul", seeded((4, 9)), (2, 4)))
    with pytest.raises(ValueError, match="do not split"):
        split_fused(layer, [3, 3, 2])


# --- BatchNorm folding ------------------------------------------------------------------------

def _bn_params(c: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"gamma": rng.uniform(0.5, 2, c).astype(np.float32), "beta": rng.standard_normal(c).astype(np.float32),
            "mean": rng.standard_normal(c).astype(np.float32), "var": rng.uniform(0.2, 3, c).astype(np.float32)}


def _with_bn(op: str, weight: np.ndarray, bias: np.ndarray | None, x_dims: list[int], c: int,
             **attrs) -> onnx.ModelProto:
    inputs = ["x", "w"] + (["b"] if bias is not None else [])
    nodes = [helper.make_node(op, inputs, ["h"], name="layer", **attrs),
             helper.make_node("BatchNormalization", ["h", "gamma", "beta", "mean", "var"], ["y"],
                              name="bn", epsilon=1e-3)]
    init = dict(w=weight, **({"b": bias} if bias is not None else {}), **_bn_params(c, 22))
    return _model(nodes, [_value("x", x_dims)], [_value("y", [None] * len(x_dims))], init)


@pytest.mark.parametrize(("op", "wshape", "attrs", "c_out"), [
    ("Conv", (4, 3, 3, 3), dict(pads=[1, 1, 1, 1]), 4),
    ("Conv", (4, 1, 3, 3), dict(group=2, strides=[2, 2]), 4),
    ("ConvTranspose", (4, 3, 3, 3), dict(group=2, strides=[2, 2]), 6),
    ("Gemm", (5, 12), dict(transB=1), 5),
])
@pytest.mark.parametrize("has_bias", [True, False])
def test_fold_batchnorm_reproduces_layer_plus_bn(op, wshape, attrs, c_out, has_bias):
    weight = seeded(wshape, 23)
    bias = seeded((c_out,), 24) if has_bias else None
    c_in = wshape[1] * attrs.get("group", 1) if op == "Conv" else wshape[0] if op == "ConvTranspose" else 12
    x_dims = [2, 12] if op == "Gemm" else [1, c_in, 6, 6]
    model = _with_bn(op, weight, bias, x_dims, c_out, **attrs)
    (plain,), _ = _extract(model)
    (folded,), notes = _extract(model, fold_batchnorm=True)
    np.testing.assert_array_equal(plain.weight, weight)  # off: as the model computes it (transB=1)
    assert "BatchNormalization 'bn' folded in" in notes["layer"][0]
    x = seeded(x_dims, 25)
    (expected,) = _run(model, x=x)
    if op == "Gemm":
        ours = x @ folded.weight.T + folded.bias
    elif op == "Conv":
        ours = _conv(folded, x)
    else:
        ours = F.conv_transpose2d(torch.from_numpy(x), torch.tensor(folded.weight),
                                  torch.tensor(folded.bias), stride=folded.strides,
                                  groups=folded.groups).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)


def test_batchnorm_read_by_two_nodes_is_not_folded():
    model = _with_bn("Conv", seeded((2, 2, 3, 3), 26), None, [1, 2, 5, 5], 2)
    model.graph.node.append(helper.make_node("Relu", ["h"], ["r"]))
    model.graph.output.append(_value("r", [None] * 4))
    (layer,), notes = _extract(model, fold_batchnorm=True)
    np.testing.assert_array_equal(layer.weight, seeded((2, 2, 3, 3), 26))
    assert notes == {}


def test_fold_batchnorm_through_load_model(registry, tmp_path):
    path = tmp_path / "bn.onnx"
    onnx.save(_with_bn("Conv", seeded((2, 2, 3, 3), 27), None, [1, 2, 5, 5], 2), path)
    loaded = load_model(path, registry=registry, fold_batchnorm=True)
    assert any("folded in" in w for w in loaded.warnings)
    assert "folded in" in loaded.layers[0].note
    plain = load_model(path, registry=registry).layers[0]
    assert loaded.layers[0].content_hash != plain.content_hash and plain.note == ""


# --- ops onnx does not know: --skip-unsupported -----------------------------------------------

def _custom_op_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("FancyNorm", ["c1"], ["n"], name="fancy", domain="com.example"),
             helper.make_node("Conv", ["n", "w2"], ["c2"], name="conv2"),
             helper.make_node("Flatten", ["c2"], ["f"]),
             helper.make_node("Gemm", ["f", "w3"], ["y"], name="fc", transB=1)]
    return _model(nodes, [_value("x", [1, 2, 5, 5])], [_value("y", [1, 3])],
                  dict(w1=seeded((2, 2, 3, 3), 28), w2=seeded((2, 2, 3, 3), 29), w3=seeded((3, 18), 30)),
                  domains=("com.example",))


def test_custom_op_without_the_flag_names_the_op_and_the_flag(registry, tmp_path):
    path = tmp_path / "custom.onnx"
    onnx.save(_custom_op_model(), path)
    with pytest.raises(ModelLoadError, match=r"com\.example::FancyNorm") as info:
        load_model(path, registry=registry)
    assert "conv2" in info.value.message and "--skip-unsupported" in info.value.hint


def test_custom_op_with_the_flag_keeps_the_layers_it_can(registry, tmp_path):
    path = tmp_path / "custom.onnx"
    onnx.save(_custom_op_model(), path)
    loaded = load_model(path, registry=registry, skip_unsupported=True)
    assert [layer.name for layer in loaded.layers] == ["conv1", "conv2", "fc"]
    assert loaded.layers[0].input_shape == (2, 5, 5) and loaded.layers[1].input_shape is None
    lost = [w for w in loaded.warnings if "lost their input shape" in w]
    assert len(lost) == 1 and "conv2" in lost[0] and "conv1" not in lost[0]


def test_custom_op_the_checker_rejects_is_a_warning_with_the_flag(registry, tmp_path):
    model = _custom_op_model()
    del model.opset_import[1]  # the domain is not declared: onnx.checker refuses the model
    path = tmp_path / "undeclared.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelLoadError, match="invalid") as info:
        load_model(path, registry=registry)
    assert "--skip-unsupported" in info.value.hint
    loaded = load_model(path, registry=registry, skip_unsupported=True)
    assert [layer.name for layer in loaded.layers] == ["conv1", "conv2", "fc"]
    assert any("onnx.checker rejected" in w for w in loaded.warnings)


def test_custom_op_no_layer_depends_on_is_only_a_warning():
    model = _custom_op_model()
    model.graph.node[1].CopyFrom(helper.make_node("Relu", ["c1"], ["n"]))
    model.graph.node.append(helper.make_node("Post", ["y"], ["z"], domain="com.example"))
    model.graph.output.append(_value("z", [1, 3]))
    normalized, _ = normalize(model)
    result = extract(normalized)
    assert len(result.layers) == 3 and "no layer depends" in result.warnings[0]


def test_cli_layers_skip_unsupported(tmp_path, monkeypatch):
    from specprof.engine.cli import build_cli

    cli = build_cli()
    monkeypatch.setenv("SPECPROF_DISABLED_PLUGINS", "")
    path = tmp_path / "custom.onnx"
    onnx.save(_custom_op_model(), path)
    runner = CliRunner()
    refused = runner.invoke(cli, ["layers", str(path)])
    assert refused.exit_code == 1 and "--skip-unsupported" in refused.output
    ok = runner.invoke(cli, ["layers", str(path), "--skip-unsupported", "--output-format", "json"])
    assert ok.exit_code == 0, ok.output
    assert '"conv2"' in ok.output and '"fc"' in ok.output


@pytest.mark.parametrize("opset", [7, NEWEST])
def test_failed_conversion_keeps_the_original_opset_and_still_extracts(opset, monkeypatch):
    from onnx import version_converter

    def refuse(model, target):
        raise RuntimeError("No Adapter From Version $8 for Gemm")

    monkeypatch.setattr(version_converter, "convert_version", refuse)
    normalized, warnings = normalize(_conv_gemm(opset))
    assert [o.version for o in normalized.opset_import if o.domain == ""] == [opset]
    assert any(f"kept opset {opset}" in w for w in warnings)
    layers = extract(normalized).layers
    reference = extract(normalize(_conv_gemm(TARGET_OPSET))[0]).layers
    assert [layer.content_hash for layer in layers] == [layer.content_hash for layer in reference]


def test_notes_become_one_warning_per_distinct_note():
    from specprof.engine.extract import Extraction

    notes = {f"conv{i}": ("QLinearConv: weight dequantized",) for i in range(5)}
    notes["fc"] = ("fused QKV projection", "BatchNormalization 'bn' folded in")
    lines = Extraction((), notes=notes).note_warnings()
    assert lines == ["layers conv0, conv1, conv2 and 2 more: QLinearConv: weight dequantized",
                     "layer fc: fused QKV projection", "layer fc: BatchNormalization 'bn' folded in"]
