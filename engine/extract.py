"""Find the linear layers of a normalized ONNX model and describe each as a ``Layer``.

Weights are constants wherever they live: initializers, ``Constant`` nodes, and simple chains
on constants (Identity, Cast, Reshape, Transpose, DequantizeLinear) that exporters leave in
front of a Conv or MatMul. Everything that looks linear but cannot be profiled becomes a
``SkippedNode`` with the reason, so the user sees what was left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from specprof.engine.types import Layer, SkippedNode

_LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class _Skip(Exception):
    """Raised inside a layer builder: the node is skipped with this reason."""


def _as_float(array: np.ndarray) -> np.ndarray:
    """Keep the stored dtype, but widen half precisions (numpy's linalg cannot use them)."""
    if array.dtype == np.float16 or array.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        return array.astype(np.float32)
    return array


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes as Python values, strings decoded (onnx gives bytes)."""
    values = {}
    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        values[attribute.name] = value.decode() if isinstance(value, bytes) else value
    return values


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node (any of its value_* forms), or None if it has none."""
    for attribute in node.attribute:
        if attribute.name == "value":
            return numpy_helper.to_array(attribute.t)
        if attribute.name in ("value_float", "value_floats"):
            return np.asarray(attribute.f if attribute.name == "value_float" else attribute.floats,
                              dtype=np.float32)
        if attribute.name in ("value_int", "value_ints"):
            return np.asarray(attribute.i if attribute.name == "value_int" else attribute.ints,
                              dtype=np.int64)
    return None


def _reshape(data: np.ndarray, shape: np.ndarray, allowzero: int) -> np.ndarray:
    """ONNX Reshape: 0 copies the input's dim (unless allowzero), -1 is inferred."""
    target = [int(d) for d in shape]
    if not allowzero:
        target = [data.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return data.reshape(target)


def _dequantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int) -> np.ndarray:
    """ONNX DequantizeLinear for per-tensor and per-axis scales."""
    shift = np.zeros((), dtype=np.float32) if zero is None else zero.astype(np.float32)
    if scale.ndim == 1 and scale.size > 1:
        view = [1] * x.ndim
        view[axis] = scale.size
        scale, shift = scale.reshape(view), np.broadcast_to(shift, scale.shape).reshape(view)
    return ((x.astype(np.float32) - shift) * scale).astype(scale.dtype)


def _fold(node: onnx.NodeProto, inputs: list[np.ndarray | None]) -> np.ndarray | None:
    """Value of a constant-only node of the kinds exporters put in front of weights."""
    attrs = _attributes(node)
    if node.op_type == "Identity" and inputs and inputs[0] is not None:
        return inputs[0]
    if node.op_type == "Cast" and inputs and inputs[0] is not None:
        return inputs[0].astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if node.op_type == "Transpose" and inputs and inputs[0] is not None:
        return np.transpose(inputs[0], attrs.get("perm"))
    if node.op_type == "Reshape" and len(inputs) >= 2 and all(v is not None for v in inputs[:2]):
        return _reshape(inputs[0], inputs[1], attrs.get("allowzero", 0))
    if node.op_type == "DequantizeLinear" and len(inputs) >= 2 and inputs[0] is not None and inputs[1] is not None:
        zero = inputs[2] if len(inputs) > 2 else None
        return _dequantize(inputs[0], inputs[1], zero, attrs.get("axis", 1) % max(inputs[0].ndim, 1))
    return None


def _shapes(graph: onnx.GraphProto) -> dict[str, tuple[int | None, ...]]:
    """Inferred shapes of every value that has one (unknown dims as None)."""
    shapes: dict[str, tuple[int | None, ...]] = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in tensor_type.shape.dim
            )
    return shapes


def _sample_shape(shape: tuple[int | None, ...] | None) -> tuple[int, ...] | None:
    """(C, *spatial) of a batched tensor shape; None if unknown or any dim is dynamic."""
    if shape is None or len(shape) < 2 or any(d is None for d in shape[1:]):
        return None
    return tuple(int(d) for d in shape[1:])  # type: ignore[arg-type]


class _Context:
    """What a layer builder needs to know about the graph around one node."""

    def __init__(self, constants: dict[str, np.ndarray], shapes: dict[str, tuple[int | None, ...]]):
        self.constants = constants
        self.shapes = shapes

    def constant(self, name: str) -> np.ndarray | None:
        return self.constants.get(name) if name else None

    def sample_shape(self, name: str) -> tuple[int, ...] | None:
        return _sample_shape(self.shapes.get(name))


def _conv_pads(auto_pad: str, explicit: Sequence[int], n: tuple[int, ...] | None,
               k: tuple[int, ...], s: tuple[int, ...], d: tuple[int, ...]) -> tuple[int, ...]:
    """Explicit (begins..., ends...) pads of a Conv, resolving auto_pad like onnxruntime."""
    dims = len(k)
    if auto_pad in ("", "NOTSET"):
        return tuple(explicit) or (0,) * (2 * dims)
    if auto_pad == "VALID":
        return (0,) * (2 * dims)
    if n is None:
        raise _Skip(f"auto_pad={auto_pad} needs the input size, which is unknown; pass --input-shape")
    begins, ends = [], []
    for size, kernel, stride, dilation in zip(n, k, s, d, strict=True):
        out = -(-size // stride)
        total = max(0, (out - 1) * stride + (kernel - 1) * dilation + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return (*begins, *ends)


def _conv_transpose_pads(attrs: dict[str, Any], n: tuple[int, ...] | None, k: tuple[int, ...],
                         s: tuple[int, ...], d: tuple[int, ...],
                         output_padding: tuple[int, ...]) -> tuple[int, ...]:
    """Explicit pads of a ConvTranspose: from ``pads``, or from ``output_shape``/``auto_pad``.

    Follows the ONNX specification: total_padding = s (n - 1) + output_padding +
    (k - 1) d + 1 - output_shape, split evenly with the odd one at the end for SAME_UPPER and
    at the beginning otherwise.
    """
    dims = len(k)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    wanted = attrs.get("output_shape")
    if not wanted and auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        return tuple(attrs.get("pads", ())) or (0,) * (2 * dims)
    if n is None:
        what = "output_shape" if wanted else f"auto_pad={auto_pad}"
        raise _Skip(f"{what} needs the input size, which is unknown; pass --input-shape")
    target = list(wanted)[-dims:] if wanted else [size * stride for size, stride in zip(n, s, strict=True)]
    begins, ends = [], []
    for i in range(dims):
        total = s[i] * (n[i] - 1) + output_padding[i] + (k[i] - 1) * d[i] + 1 - target[i]
        if total < 0:
            raise _Skip(f"output_shape {list(wanted or target)} is larger than the full transposed "
                        "convolution; such padding has no explicit form")
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return (*begins, *ends)


def _conv_output_shape(op: str, weight: np.ndarray, groups: int, n: tuple[int, ...],
                       pads: tuple[int, ...], s: tuple[int, ...], d: tuple[int, ...],
                       output_padding: tuple[int, ...]) -> tuple[int, ...]:
    dims = len(n)
    k = weight.shape[2:]
    if op == "Conv":
        spatial = [(n[i] + pads[i] + pads[i + dims] - d[i] * (k[i] - 1) - 1) // s[i] + 1
                   for i in range(dims)]
        return (int(weight.shape[0]), *spatial)
    spatial = [s[i] * (n[i] - 1) + output_padding[i] + (k[i] - 1) * d[i] + 1 - pads[i] - pads[i + dims]
               for i in range(dims)]
    return (int(weight.shape[1]) * groups, *spatial)


def _conv_layer(node: onnx.NodeProto, ctx: _Context, **common: Any) -> Layer:
    weight = ctx.constant(node.input[1])
    if weight is None:
        raise _Skip("its weight is not a constant (computed at run time)")
    bias = ctx.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if len(node.input) > 2 and node.input[2] and bias is None:
        raise _Skip("its bias is not a constant (computed at run time)")
    attrs = _attributes(node)
    dims = weight.ndim - 2
    if dims < 1:
        raise _Skip(f"its weight has rank {weight.ndim}; a convolution needs at least 3")
    kernel = tuple(int(v) for v in weight.shape[2:])
    strides = tuple(attrs.get("strides", ())) or (1,) * dims
    dilations = tuple(attrs.get("dilations", ())) or (1,) * dims
    groups = int(attrs.get("group", 1))
    input_shape = ctx.sample_shape(node.input[0])
    spatial = None if input_shape is None else input_shape[1:]
    if node.op_type == "Conv":
        output_padding: tuple[int, ...] = (0,) * dims
        pads = _conv_pads(attrs.get("auto_pad", "NOTSET"), attrs.get("pads", ()), spatial,
                          kernel, strides, dilations)
    else:
        output_padding = tuple(attrs.get("output_padding", ())) or (0,) * dims
        pads = _conv_transpose_pads(attrs, spatial, kernel, strides, dilations, output_padding)
    # Computed from the layer's own parameters so that it always agrees with them: onnx's
    # shape inference gets ConvTranspose with auto_pad and output_padding wrong (onnx 1.23).
    if input_shape is not None:
        output_shape = _conv_output_shape(node.op_type, weight, groups, spatial, pads, strides,
                                          dilations, output_padding)
    else:
        output_shape = ctx.sample_shape(node.output[0])
    return Layer(op_type=node.op_type, weight=_as_float(weight),
                 bias=None if bias is None else _as_float(bias), strides=strides, pads=pads,
                 dilations=dilations, groups=groups, output_padding=output_padding,
                 input_shape=input_shape, output_shape=output_shape, **common)


def _matrix_layer(op: str, matrix: np.ndarray, bias: np.ndarray | None, **common: Any) -> Layer:
    matrix = _as_float(matrix)
    return Layer(op_type=op, weight=matrix, bias=None if bias is None else _as_float(bias),
                 input_shape=(int(matrix.shape[1]),), output_shape=(int(matrix.shape[0]),), **common)


def _gemm_layer(node: onnx.NodeProto, ctx: _Context, **common: Any) -> Layer:
    """Y = alpha A' B' + beta C; the matrix of the map on one sample (a row of A, or a column of B)."""
    a, b = ctx.constant(node.input[0]), ctx.constant(node.input[1])
    attrs = _attributes(node)
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if a is None and b is None:
        raise _Skip("both operands are activations (not a layer with weights)")
    if a is not None and b is not None:
        raise _Skip("both operands are constants (folded at export, not a layer)")
    bias = None
    if b is not None:  # rows of A are samples: x -> alpha B'^T x
        b_used = b.T if attrs.get("transB", 0) else b
        matrix = alpha * b_used.T
        c = ctx.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if c is not None and c.size == matrix.shape[0]:
            bias = beta * c.reshape(-1)
    else:  # columns of B are samples: x -> alpha A' x
        matrix = alpha * (a.T if attrs.get("transA", 0) else a)
    return _matrix_layer("Gemm", matrix, bias, **common)


def _matmul_layer(node: onnx.NodeProto, ctx: _Context, **common: Any) -> Layer:
    left, right = ctx.constant(node.input[0]), ctx.constant(node.input[1])
    if left is None and right is None:
        raise _Skip("both operands are activations (not a layer with weights)")
    if left is not None and right is not None:
        raise _Skip("both operands are constants (folded at export, not a layer)")
    weight = right if right is not None else left
    if weight.ndim > 2:
        raise _Skip(f"its constant operand has rank {weight.ndim}; only 2-D weights are profiled")
    if weight.ndim == 1:  # a dot product with one vector: a 1 x K map
        return _matrix_layer("MatMul", weight.reshape(1, -1), None, **common)
    # X @ W maps a row x to x W, i.e. the matrix W^T; W @ X maps a column x to W x.
    return _matrix_layer("MatMul", weight.T if right is not None else weight, None, **common)


_BUILDERS: dict[str, Callable[..., Layer]] = {
    "Conv": _conv_layer,
    "ConvTranspose": _conv_layer,
    "Gemm": _gemm_layer,
    "MatMul": _matmul_layer,
}


def graph_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every value of the main graph that is known without running it, by name."""
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and not node.domain:
            value = _constant_node_value(node)
        elif node.op_type in ("Identity", "Cast", "Transpose", "Reshape", "DequantizeLinear"):
            value = _fold(node, [constants.get(name) if name else None for name in node.input])
        else:
            continue
        if value is not None and node.output:
            constants[node.output[0]] = value
    return constants


def extract_layers(model: onnx.ModelProto) -> tuple[list[Layer], list[SkippedNode]]:
    """The linear layers of ``model`` in graph order, and the linear-looking nodes skipped.

    ``model`` should be normalized (shapes inferred) so that each layer knows its input size.
    """
    graph = model.graph
    ctx = _Context(graph_constants(graph), _shapes(graph))
    layers: list[Layer] = []
    skipped: list[SkippedNode] = []
    for node in graph.node:
        if node.op_type not in _LINEAR_OPS or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or node.output[0]
        try:
            layer = _BUILDERS[node.op_type](node, ctx, name=name, node_name=node.name,
                                            index=len(layers))
        except _Skip as reason:
            skipped.append(SkippedNode(name=name, op_type=node.op_type, reason=str(reason)))
            continue
        layers.append(layer)
    return layers, skipped

