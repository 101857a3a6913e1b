"""Find the linear layers of a normalized ONNX model and describe each as a ``Layer``.

Weights are constants wherever they live: initializers, ``Constant`` nodes, and simple chains
on constants (Identity, Cast, Reshape, Transpose, DequantizeLinear) that exporters leave in
front of a Conv or MatMul. Quantized ops (QLinearConv, QLinearMatMul, ConvInteger,
MatMulInteger) become the float layer of their dequantized weight. Everything that looks
linear but cannot be profiled becomes a ``SkippedNode`` with the reason, so the user sees what
was left out.

Weights are read lazily and once: a model whose data stays in external files (over 2 GB) has
each tensor read from disk the first time a layer needs it, and never again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from specprof.engine.errors import ModelLoadError
from specprof.engine.types import Layer, SkippedNode

_LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "QLinearConv", "QLinearMatMul",
               "ConvInteger", "MatMulInteger")
_QUANTIZED_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")
# Nodes whose value is computed from constants alone by ``_fold`` (or is a constant itself).
_FOLDABLE_OPS = ("Constant", "Identity", "Cast", "Transpose", "Reshape", "DequantizeLinear")
_DEFAULT_DOMAINS = ("", "ai.onnx")
_SKIP_HINT = "pass --skip-unsupported to profile the layers that can be extracted"


def _check_conv_attributes(weight: np.ndarray, kernel: tuple[int, ...],
                           strides: tuple[int, ...], dilations: tuple[int, ...], groups: int,
                           kernel_shape: tuple[int, ...]) -> None:
    """Refuse attributes no runtime accepts (a ``ValueError`` naming the attribute), before any
    arithmetic divides by them: ONNX's checker does not look at attribute values."""
    dims = len(kernel)
    for name, values in (("strides", strides), ("dilations", dilations)):
        if len(values) != dims or any(int(v) < 1 for v in values):
            raise ValueError(f"{name} {list(values)} must be {dims} positive integers")
    if kernel_shape and tuple(int(v) for v in kernel_shape) != kernel:
        raise ValueError(f"kernel_shape {list(kernel_shape)} contradicts the weight's "
                         f"{list(kernel)}")
    channels = int(weight.shape[0])  # Conv: c_out; ConvTranspose: c_in; both split by group
    if groups < 1 or channels % groups:
        raise ValueError(f"group {groups} must be a positive divisor of the weight's first "
                         f"dimension {channels}")


def _text(value: str | bytes) -> str:
    """A name as text: protobuf hands back bytes where a file holds invalid UTF-8."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class _Skip(Exception):
    """Raised inside a layer builder: the node is skipped with this reason."""


def _as_float(array: np.ndarray) -> np.ndarray:
    """Keep the stored dtype, but widen half precisions (numpy's linalg cannot use them).

    Complex, text and other non-real weights are refused (a ``ValueError``, which names the
    node): dropping an imaginary part would profile another layer than the model's."""
    if array.dtype == np.float16 or array.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        return array.astype(np.float32)
    if array.dtype.kind not in "fiu":
        raise ValueError(f"its weight has dtype {array.dtype}: a linear layer needs real numbers")
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


def _along(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """A per-axis vector (or a scalar) shaped to broadcast along ``axis`` of an ``ndim`` array."""
    values = np.asarray(values)
    if values.size == 1:
        return values.reshape(())
    view = [1] * ndim
    view[axis] = values.size
    return values.reshape(view)


def _dequantize(x: np.ndarray, scale: np.ndarray | None, zero: np.ndarray | None,
                axis: int) -> np.ndarray:
    """ONNX DequantizeLinear, (x - zero) * scale, per tensor or per ``axis``.

    ``scale`` None gives ``x - zero`` in integer units (ConvInteger/MatMulInteger have no scale).
    """
    shift = np.zeros((), np.float32) if zero is None else _along(zero.astype(np.float32), x.ndim, axis)
    if scale is None:
        return (x.astype(np.float32) - shift).astype(np.float32)
    scale = np.asarray(scale)
    dtype = scale.dtype if scale.dtype.kind == "f" else np.float32
    return ((x.astype(np.float32) - shift) * _along(_as_float(scale), x.ndim, axis)).astype(dtype)


def _fold(node: onnx.NodeProto, inputs: list[np.ndarray | None]) -> np.ndarray | None:
    """Value of a constant-only node of the kinds exporters put in front of weights."""
    attrs = _attributes(node)
    if node.op_type == "Identity" and inputs and inputs[0] is not None:
        return inputs[0]
    if node.op_type == "Cast" and inputs and inputs[0] is not None:
        return inputs[0].astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if node.op_type == "Transpose" and inputs and inputs[0] is not None:
        return np.transpose(inputs[0], attrs.get("perm"))
    if node.op_type == "Reshape" and len(inputs) >= 2:
        data, shape = inputs[0], inputs[1]
        if data is not None and shape is not None:
            return _reshape(data, shape, attrs.get("allowzero", 0))
    if node.op_type == "DequantizeLinear" and len(inputs) >= 2 and inputs[0] is not None and inputs[1] is not None:
        zero = inputs[2] if len(inputs) > 2 else None
        # Opset 21's blocked quantization (block_size) is not handled: refuse, do not guess.
        if attrs.get("block_size", 0):
            return None
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


class _Constants:
    """Values known without running the graph, computed on first use and cached.

    Initializers (read from external files when ``base_dir`` is given), ``Constant`` nodes and
    the simple chains in ``_FOLDABLE_OPS``. Lazy so that a weight nobody asks for is never read,
    and cached so that none is read twice.
    """

    def __init__(self, graph: onnx.GraphProto, base_dir: str = "") -> None:
        self._tensors = {tensor.name: tensor for tensor in graph.initializer}
        self._producers = {node.output[0]: node for node in graph.node
                           if node.op_type in _FOLDABLE_OPS and node.domain in _DEFAULT_DOMAINS
                           and node.output}
        self._base_dir = base_dir
        self._values: dict[str, np.ndarray | None] = {}

    def names(self) -> list[str]:
        return [*self._tensors, *self._producers]

    def get(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        if name not in self._values:
            self._values[name] = self._compute(name)
        return self._values[name]

    def _compute(self, name: str) -> np.ndarray | None:
        tensor = self._tensors.get(name)
        if tensor is not None:
            return numpy_helper.to_array(tensor, base_dir=self._base_dir)
        node = self._producers.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            return _constant_node_value(node)
        return _fold(node, [self.get(i) for i in node.input])


class _Context:
    """What a layer builder needs to know about the graph around one node."""

    def __init__(self, graph: onnx.GraphProto, base_dir: str = "") -> None:
        self.constants = _Constants(graph, base_dir)
        self.shapes = _shapes(graph)
        self.producers = {output: node for node in graph.node for output in node.output if output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {value.name for value in graph.output}
        self.notes: dict[str, list[str]] = {}

    def constant(self, name: str) -> np.ndarray | None:
        return self.constants.get(name)

    def sample_shape(self, name: str) -> tuple[int, ...] | None:
        return _sample_shape(self.shapes.get(name))

    def only_consumer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        """The node that alone reads ``name``, if it is a default-domain ``op_type``."""
        users = self.consumers.get(name, [])
        if (len(users) != 1 or name in self.graph_outputs or users[0].op_type != op_type
                or users[0].domain not in _DEFAULT_DOMAINS):
            return None
        return users[0]

    def note(self, layer_name: str, text: str) -> None:
        self.notes.setdefault(layer_name, []).append(text)

    def integer_output_scale(self, name: str) -> np.ndarray | None:
        """The weight scale applied after a ConvInteger/MatMulInteger, if the graph shows it.

        onnxruntime's dynamic quantization writes ``Cast(int32 -> float)`` then ``Mul(., S)``
        with ``S = Mul(x_scale, w_scale)``: ``x_scale`` is computed at run time, ``w_scale`` is
        the constant we want. A constant ``S`` (static activation scale) is taken whole.
        """
        cast = self.only_consumer(name, "Cast")
        if cast is None or _attributes(cast).get("to") != onnx.TensorProto.FLOAT:
            return None
        mul = self.only_consumer(cast.output[0], "Mul")
        if mul is None:
            return None
        other = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
        value = self.constant(other)
        if value is not None:
            return value
        producer = self.producers.get(other)
        if producer is None or producer.op_type != "Mul":
            return None
        factors = [self.constant(i) for i in producer.input]
        known = [f for f in factors if f is not None]
        return known[0] if len(known) == 1 else None


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



def _conv_from_parts(node: onnx.NodeProto, ctx: _Context, op_type: str, weight: np.ndarray,
                     bias: np.ndarray | None, **common: Any) -> Layer:
    """A Conv/ConvTranspose layer from its weight, bias and the node's attributes."""
    attrs = _attributes(node)
    dims = weight.ndim - 2
    if dims < 1:
        raise _Skip(f"its weight has rank {weight.ndim}; a convolution needs at least 3")
    kernel = tuple(int(v) for v in weight.shape[2:])
    strides = tuple(attrs.get("strides", ())) or (1,) * dims
    dilations = tuple(attrs.get("dilations", ())) or (1,) * dims
    groups = int(attrs.get("group", 1))
    _check_conv_attributes(weight, kernel, strides, dilations, groups,
                           tuple(attrs.get("kernel_shape", ())))
    input_shape = ctx.sample_shape(node.input[0])
    spatial = None if input_shape is None else input_shape[1:]
    padding_mode: str = "zeros"
    if op_type == "Conv":
        output_padding: tuple[int, ...] = (0,) * dims
        pads = _conv_pads(attrs.get("auto_pad", "NOTSET"), attrs.get("pads", ()), spatial,
                          kernel, strides, dilations)
        wrap = _circular_padding(node, ctx, pads, kernel, dilations)
        if wrap is not None:
            source, pads = wrap
            padding_mode = "circular"
            input_shape = ctx.sample_shape(source)
            spatial = None if input_shape is None else input_shape[1:]
    else:
        output_padding = tuple(attrs.get("output_padding", ())) or (0,) * dims
        pads = _conv_transpose_pads(attrs, spatial, kernel, strides, dilations, output_padding)
    # Computed from the layer's own parameters so that it always agrees with them: onnx's
    # shape inference gets ConvTranspose with auto_pad and output_padding wrong (onnx 1.23).
    output_shape: tuple[int, ...] | None
    if spatial is not None:
        output_shape = _conv_output_shape(op_type, weight, groups, spatial, pads, strides,
                                          dilations, output_padding)
    else:
        output_shape = ctx.sample_shape(node.output[0])
    return Layer(op_type=op_type, weight=_as_float(weight),  # type: ignore[arg-type]
                 bias=None if bias is None else _as_float(bias), strides=strides, pads=pads,
                 dilations=dilations, groups=groups, output_padding=output_padding,
                 input_shape=input_shape, output_shape=output_shape,
                 padding_mode=padding_mode, **common)  # type: ignore[arg-type]


def _circular_padding(node: onnx.NodeProto, ctx: _Context, conv_pads: tuple[int, ...],
                      kernel: tuple[int, ...], dilations: tuple[int, ...]
                      ) -> tuple[str, tuple[int, ...]] | None:
    """(tensor before the pad, spatial wrap pads) when ``Pad(mode="wrap")`` feeds this Conv.

    Only the 'same' case is folded: the Conv itself pads nothing and the wrap adds exactly
    dil * (k - 1) per axis, so the map is the periodic convolution on the unpadded input (the
    operator of the ``circular`` boundary). Other wrap amounts keep the Conv on the padded
    tensor, as the graph says.
    """
    pad = ctx.producers.get(node.input[0])
    if pad is None or pad.op_type != "Pad" or any(conv_pads):
        return None
    mode = _attributes(pad).get("mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "wrap":
        return None
    amounts = ctx.constant(_input(pad, 1))
    axes = ctx.constant(_input(pad, 3)) if _input(pad, 3) else None
    shape = ctx.sample_shape(pad.input[0])
    if amounts is None or shape is None:
        return None
    rank = len(shape) + 1  # with the batch axis
    full = np.zeros(2 * rank, dtype=np.int64)
    chosen = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    half = len(chosen)
    for i, axis in enumerate(chosen):
        full[axis], full[axis + rank] = amounts[i], amounts[i + half]
    if full[:2].any() or full[rank:rank + 2].any():
        return None  # wraps the batch or channel axis: not a convolution's padding
    spatial = tuple(int(v) for v in (*full[2:rank], *full[rank + 2:]))
    d = len(kernel)
    if any(spatial[j] + spatial[j + d] != dilations[j] * (kernel[j] - 1) for j in range(d)):
        return None
    return pad.input[0], spatial


def _conv_layer(node: onnx.NodeProto, ctx: _Context, **common: Any) -> Layer:
    weight = ctx.constant(node.input[1])
    if weight is None:
        raise _Skip("its weight is not a constant (computed at run time)")
    bias = ctx.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if len(node.input) > 2 and node.input[2] and bias is None:
        raise _Skip("its bias is not a constant (computed at run time)")
    return _conv_from_parts(node, ctx, node.op_type, weight, bias, **common)


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def _qlinear_conv_layer(node: onnx.NodeProto, ctx: _Context, **common: Any) -> Layer:
    """QLinearConv: the float Conv of (w - w_zero_point) * w_scale, per tensor or per channel.

    The int32 bias is in units of x_scale * w_scale; it is dequantized when x_scale is a
    constant (it always is in QLinearConv) and dropped otherwise: it does not change spectra.
    """
    w, w_scale = ctx.constant(node.input[3]), ctx.constant(node.input[4])
    if w is None or w_scale is None:
        raise _Skip("its quantized weight or weight scale is not a constant")
    weight = _dequantize(w, w_scale, ctx.constant(_input(node, 5)), axis=0)
    bias, x_scale = ctx.constant(_input(node, 8)), ctx.constant(node.input[1])
    if bias is not None and x_scale is not None:
        bias = (bias.astype(np.float64) * (x_scale.astype(np.float64) * w_scale.astype(np.float64))
                ).astype(np.float32).reshape(-1)
    else:
        bias = None
    ctx.note(common["name"], f"{node.op_type}: weight dequantized as (w - zero_point) * scale"
             f"{' per channel' if w_scale.size > 1 else ''}")
    return _conv_from_parts(node, ctx, "Conv", weight, bias, **common)


def _integer_weight(node: onnx.NodeProto, ctx: _Context, weight: np.ndarray, zero: np.ndarray | None,
                    axis: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(w - zero_point) of a ConvInteger/MatMulInteger, and the scale found after it (or None)."""
    scale = ctx.integer_output_scale(node.output[0])
    return _dequantize(weight, None, zero, axis), None if scale is None else np.asarray(scale)


def _integer_note(ctx: _Context, name: str, op: str, scale: np.ndarray | None) -> None:
    if scale is None:
        ctx.note(name, f"{op}: weight is (w - zero_point) in integer units, its scale was not "
                       "found after the node, so the spectrum is off by that scale")
    else:
        ctx.note(name, f"{op}: weight dequantized as (w - zero_point) * scale, the scale taken "
                       "from the Cast/Mul after the node")


def _conv_integer_layer(node: onnx.NodeProto, ctx: _Context, **common: Any) -> Layer:
    """ConvInteger computes conv(x - x_zero_point, w - w_zero_point) in int32."""
    w = ctx.constant(node.input[1])
    if w is None:
        raise _Skip("its quantized weight is not a constant")
    weight, scale = _integer_weight(node, ctx, w, ctx.constant(_input(node, 3)), axis=0)
    if scale is not None:
        if scale.size not in (1, weight.shape[0]):
            raise _Skip(f"the scale after it has {scale.size} values for {weight.shape[0]} channels")
        weight = weight * _along(scale.astype(np.float32).reshape(-1), weight.ndim, 0)
    _integer_note(ctx, common["name"], node.op_type, scale)
    return _conv_from_parts(node, ctx, "Conv", weight, None, **common)


def _matrix_layer(op: str, matrix: np.ndarray, bias: np.ndarray | None, **common: Any) -> Layer:
    matrix = _as_float(matrix)
    return Layer(op_type=op, weight=matrix, bias=None if bias is None else _as_float(bias),  # type: ignore[arg-type]
                 input_shape=(int(matrix.shape[1]),), output_shape=(int(matrix.shape[0]),), **common)


def _gemm_layer(node: onnx.NodeProto, ctx: _Context, **common: Any) -> Layer:
    """Y = alpha A' B' + beta C; the matrix of the map on one sample (a row of A, or a column of B)."""
    a, b = ctx.constant(node.input[0]), ctx.constant(node.input[1])
    attrs = _attributes(node)
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        raise ValueError(f"Gemm alpha {alpha} / beta {beta} must be finite numbers")
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
        assert a is not None  # exactly one operand is constant (checked above)
        matrix = alpha * (a.T if attrs.get("transA", 0) else a)
    return _matrix_layer("Gemm", matrix, bias, **common)


def _operands(node: onnx.NodeProto, ctx: _Context, left_index: int,
              right_index: int) -> tuple[np.ndarray, bool]:
    """The constant operand of a matrix product, and whether it is the right one (x @ W)."""
    left, right = ctx.constant(node.input[left_index]), ctx.constant(node.input[right_index])
    if left is None and right is None:
        raise _Skip("both operands are activations (not a layer with weights)")
    if left is not None and right is not None:
        raise _Skip("both operands are constants (folded at export, not a layer)")
    weight = right if right is not None else left
    if weight.ndim > 2:  # type: ignore[union-attr]
        raise _Skip(f"its constant operand has rank {weight.ndim}; only 2-D weights are profiled")  # type: ignore[union-attr]
    return weight, right is not None  # type: ignore[return-value]


def _product_matrix(weight: np.ndarray, on_right: bool) -> np.ndarray:
    """The (out, in) matrix of x -> x W (``on_right``: the matrix W^T) or x -> W x (W)."""
    if weight.ndim == 1:  # a dot product with one vector: a 1 x K map
        return weight.reshape(1, -1)
    return weight.T if on_right else weight


def _matmul_layer(node: onnx.NodeProto, ctx: _Context, **common: Any) -> Layer:
    weight, on_right = _operands(node, ctx, 0, 1)
    return _matrix_layer("MatMul", _product_matrix(weight, on_right), None, **common)


def _qlinear_matmul_layer(node: onnx.NodeProto, ctx: _Context, **common: Any) -> Layer:
    """QLinearMatMul: the float MatMul of the dequantized constant operand.

    B (K, N) is quantized per tensor or per column (its last axis), A (M, K) per row.
    """
    weight, on_right = _operands(node, ctx, 0, 3)
    scale = ctx.constant(node.input[4] if on_right else node.input[1])
    zero = ctx.constant(_input(node, 5) if on_right else node.input[2])
    if scale is None:
        raise _Skip("the scale of its quantized weight is not a constant")
    axis = weight.ndim - 1 if on_right else 0
    ctx.note(common["name"], f"{node.op_type}: weight dequantized as (w - zero_point) * scale"
             f"{' per column' if scale.size > 1 else ''}")
    return _matrix_layer("MatMul", _product_matrix(_dequantize(weight, scale, zero, axis), on_right),
                         None, **common)


def _matmul_integer_layer(node: onnx.NodeProto, ctx: _Context, **common: Any) -> Layer:
    """MatMulInteger computes (A - a_zero_point) (B - b_zero_point) in int32."""
    weight, on_right = _operands(node, ctx, 0, 1)
    zero = ctx.constant(_input(node, 3) if on_right else _input(node, 2))
    integer, scale = _integer_weight(node, ctx, weight, zero, weight.ndim - 1 if on_right else 0)
    matrix = _product_matrix(integer, on_right)
    if scale is not None:  # one scale per output feature: the matrix's rows
        if scale.size not in (1, matrix.shape[0]):
            raise _Skip(f"the scale after it has {scale.size} values for {matrix.shape[0]} outputs")
        matrix = matrix * _along(scale.astype(np.float32).reshape(-1), 2, 0)
    _integer_note(ctx, common["name"], node.op_type, scale)
    return _matrix_layer("MatMul", matrix, None, **common)


_BUILDERS: dict[str, Callable[..., Layer]] = {
    "Conv": _conv_layer,
    "ConvTranspose": _conv_layer,
    "Gemm": _gemm_layer,
    "MatMul": _matmul_layer,
    "QLinearConv": _qlinear_conv_layer,
    "QLinearMatMul": _qlinear_matmul_layer,
    "ConvInteger": _conv_integer_layer,
    "MatMulInteger": _matmul_integer_layer,
}

# --- after a layer: BatchNorm folding and fused projections ------------------------------------

def _batchnorm_after(node: onnx.NodeProto, ctx: _Context) -> tuple[onnx.NodeProto, np.ndarray, np.ndarray] | None:
    """The inference-mode BatchNormalization that alone reads ``node``'s output, as (node, a, c).

    BN(y) = a * y + c per channel, a = gamma / sqrt(var + eps), c = beta - mean * a. None when
    there is no such BN or one of its parameters is computed at run time.
    """
    bn = ctx.only_consumer(node.output[0], "BatchNormalization")
    if bn is None or _attributes(bn).get("training_mode", 0) or any(bn.output[1:]):
        return None
    params = [ctx.constant(_input(bn, i)) for i in range(1, 5)]
    if any(p is None for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)  # type: ignore[union-attr]
    a = gamma / np.sqrt(var + float(_attributes(bn).get("epsilon", 1e-5)))
    return bn, a, beta - mean * a


def _fold_batchnorm(layer: Layer, node: onnx.NodeProto, ctx: _Context) -> Layer:
    """``layer`` with the BatchNormalization after it folded into its weight and bias.

    W' = W * a per output channel (for ConvTranspose the output channel of weight[i, j] is
    group(i) * c_out/groups + j), b' = (b - mean) * a + beta = a * b + c.
    """
    found = _batchnorm_after(node, ctx)
    if found is None or layer.op_type not in ("Conv", "ConvTranspose", "Gemm"):
        return layer
    if layer.op_type == "Gemm" and ctx.constant(node.input[0]) is not None:
        return layer  # samples are columns: BN's channel axis 1 is the batch, not a feature
    bn, a, c = found
    if a.size != layer.out_channels:
        return layer
    weight = layer.weight.astype(np.float64)
    if layer.op_type == "ConvTranspose":
        per_group_in, per_group_out = weight.shape[0] // layer.groups, weight.shape[1]
        channel = (np.arange(weight.shape[0])[:, None] // per_group_in) * per_group_out \
            + np.arange(per_group_out)[None, :]
        weight = weight * a[channel].reshape(*channel.shape, *([1] * layer.spatial_dims))
    else:  # Conv (c_out, ...) and the (out, in) matrix of a Gemm: output channels on axis 0
        weight = weight * _along(a, weight.ndim, 0)
    bias = a * (0.0 if layer.bias is None else layer.bias.astype(np.float64)) + c
    ctx.note(layer.name, f"BatchNormalization '{bn.name or bn.output[0]}' folded in")
    dtype = layer.weight.dtype
    return dataclasses.replace(layer, weight=weight.astype(dtype), bias=bias.astype(dtype))


def _split_sizes(split: onnx.NodeProto, ctx: _Context, total: int) -> list[int] | None:
    """The part sizes of a Split node, from its input (opset 13+), attribute, or equal parts."""
    sizes = ctx.constant(_input(split, 1))
    if sizes is None:
        sizes = _attributes(split).get("split")
    if sizes is not None and len(sizes):
        return [int(v) for v in sizes]
    parts = len(split.output)
    return [total // parts] * parts if parts and total % parts == 0 else None


def _note_fused_projection(layer: Layer, node: onnx.NodeProto, ctx: _Context) -> None:
    """Say so when a matrix layer's output is split along its features (fused QKV).

    The layer stays one layer: the graph computes one linear map onto the concatenated
    [q; k; v], and that map's spectrum is what bounds it. ``split_fused`` gives the parts.
    """
    out = node.output[0]
    add = ctx.only_consumer(out, "Add")  # a bias between the product and the split
    if add is not None and any(ctx.constant(i) is not None for i in add.input):
        out = add.output[0]
    split = ctx.only_consumer(out, "Split")
    if split is None:
        return
    rank = len(ctx.shapes.get(out, ())) or None
    axis = int(_attributes(split).get("axis", 0))
    if rank is None or axis not in (-1, rank - 1):
        return
    sizes = _split_sizes(split, ctx, layer.out_channels)
    if sizes is None or sum(sizes) != layer.out_channels:
        return
    what = "fused QKV projection" if len(sizes) == 3 else "fused projection"
    ctx.note(layer.name, f"{what}: output split into {'+'.join(map(str, sizes))} features by "
             f"'{split.name or split.output[0]}'; profiled as one layer (see docs/onnx.md)")


def split_fused(layer: Layer, sizes: Sequence[int],
                labels: Sequence[str] = ("q", "k", "v")) -> list[Layer]:
    """The parts of a fused matrix layer, one per block of output features: ``name[q]``, ...

    For per-projection spectra of a fused QKV layer (the spectrum of the whole layer is that of
    the stacked matrix, which is not the union of the parts' spectra).
    """
    if layer.is_conv or sum(sizes) != layer.out_channels:
        raise ValueError(f"sizes {list(sizes)} do not split the {layer.out_channels} outputs "
                         f"of matrix layer {layer.name}")
    names = list(labels) if len(labels) == len(sizes) else [str(i) for i in range(len(sizes))]
    parts, start = [], 0
    for label, size in zip(names, sizes, strict=True):
        rows = slice(start, start + size)
        parts.append(dataclasses.replace(
            layer, name=f"{layer.name}[{label}]", weight=layer.weight[rows],
            bias=None if layer.bias is None else layer.bias[rows], output_shape=(size,)))
        start += size
    return parts


# --- ops onnx does not know ----------------------------------------------------------------------

def _is_standard(node: onnx.NodeProto) -> bool:
    domain = "" if node.domain == "ai.onnx" else node.domain
    return onnx.defs.has(node.op_type, domain)


def _downstream(graph: onnx.GraphProto, sources: list[onnx.NodeProto]) -> set[str]:
    """Every value computed (directly or not) from the outputs of ``sources``."""
    tainted = {name for node in sources for name in node.output if name}
    for node in graph.node:  # graph order is topological
        if any(name in tainted for name in node.input):
            tainted.update(name for name in node.output if name)
    return tainted


def _check_unsupported(graph: onnx.GraphProto, layers: list[Layer], layer_inputs: dict[str, str],
                       skip_unsupported: bool) -> list[str]:
    """Warnings (or, without ``skip_unsupported``, an error) for ops unknown to onnx.

    Shape inference cannot see through such an op, so convolutions after it lose their input
    size. That is an error unless the user asked to go on with what can be extracted.
    """
    unknown = [node for node in graph.node if not _is_standard(node)]
    if not unknown:
        return []
    ops = ", ".join(sorted({f"'{n.name or n.output[0]}' ({n.domain or 'ai.onnx'}::{n.op_type})"
                            for n in unknown}))
    tainted = _downstream(graph, unknown)
    lost = [layer.name for layer in layers
            if layer.input_shape is None and layer_inputs.get(layer.name) in tainted]
    if not lost:
        return [f"node(s) {ops} are not standard ONNX ops; no layer depends on their shapes"]
    listed = ", ".join(lost[:5]) + (", ..." if len(lost) > 5 else "")
    if not skip_unsupported:
        raise ModelLoadError(
            f"node(s) {ops} are not standard ONNX ops: shape inference stops there and "
            f"{len(lost)} layer(s) after them have no input size ({listed})", _SKIP_HINT)
    return [f"node(s) {ops} are not standard ONNX ops: {len(lost)} layer(s) after them lost "
            f"their input shape ({listed}); their operator spectra need shapes onnx cannot infer"]


# --- the whole graph -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Extraction:
    """The layers of a model, the nodes skipped, and what the user should know about them.

    ``notes`` maps a layer's name to remarks such as 'QLinearConv: weight dequantized...',
    'fused QKV projection...' or 'BatchNormalization ... folded in'.
    """

    layers: tuple[Layer, ...]
    skipped: tuple[SkippedNode, ...] = ()
    notes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def note_warnings(self) -> list[str]:
        """The notes as warning lines, one per distinct note, naming the layers it is about.

        (A stand-in until ``Layer`` carries its note itself.) Grouped so that a quantized model
        of a hundred layers gives one line, not a hundred.
        """
        by_text: dict[str, list[str]] = {}
        for name, texts in self.notes.items():
            for text in texts:
                by_text.setdefault(text, []).append(name)
        lines = []
        for text, names in by_text.items():
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            lines.append(f"layer{'s' if len(names) > 1 else ''} {', '.join(names[:3])}{more}: {text}")
        return lines


def extract(model: onnx.ModelProto, *, fold_batchnorm: bool = False,
            skip_unsupported: bool = False, base_dir: str = "") -> Extraction:
    """The linear layers of ``model`` in graph order, the nodes skipped, notes and warnings.

    ``model`` should be normalized (shapes inferred) so that each layer knows its input size.
    ``base_dir`` is the folder of external data files not yet loaded (models over 2 GB).
    ``fold_batchnorm`` folds an inference BatchNormalization that alone reads a Conv,
    ConvTranspose or Gemm output into that layer. ``skip_unsupported`` turns a node that
    fails to extract, or an unknown op that hides input sizes, into a skip and a warning
    instead of a ``ModelLoadError``.
    """
    graph = model.graph
    ctx = _Context(graph, base_dir)
    layers: list[Layer] = []
    skipped: list[SkippedNode] = []
    layer_inputs: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in _BUILDERS or node.domain not in _DEFAULT_DOMAINS:
            continue
        name = _text(node.name or node.output[0])
        try:
            layer = _BUILDERS[node.op_type](node, ctx, name=name, node_name=_text(node.name),
                                            index=len(layers))
            if fold_batchnorm:
                layer = _fold_batchnorm(layer, node, ctx)
            if not layer.is_conv:
                _note_fused_projection(layer, node, ctx)
        except _Skip as reason:
            skipped.append(SkippedNode(name=name, op_type=node.op_type, reason=str(reason)))
            continue
        except (ValueError, TypeError, IndexError, KeyError) as error:
            # A node this code does not understand (odd shapes, dtypes, attributes).
            if not skip_unsupported:
                raise ModelLoadError(f"cannot extract node '{name}' ({node.op_type}): {error}",
                                     _SKIP_HINT) from error
            skipped.append(SkippedNode(name=name, op_type=node.op_type,
                                       reason=f"extraction failed: {error}"))
            continue
        layers.append(layer)
        layer_inputs[name] = node.input[0]
    warnings = _check_unsupported(graph, layers, layer_inputs, skip_unsupported)
    notes = {name: tuple(texts) for name, texts in ctx.notes.items()}
    return Extraction(tuple(layers), tuple(skipped), notes, tuple(warnings))


def extract_layers(model: onnx.ModelProto, **options: Any) -> tuple[list[Layer], list[SkippedNode]]:
    """``extract`` for callers that want only the layers and the skipped nodes."""
    result = extract(model, **options)
    return list(result.layers), list(result.skipped)
