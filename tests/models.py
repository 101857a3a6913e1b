"""Small test models, built with onnx.helper (and torch for the PyTorch importer's tests).

Importing this module does not import torch: ``SmallTorchCNN`` is created on first access
from ``SMALL_TORCH_CNN_SOURCE``, the same source the ``--model-class`` test writes into a
module file of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEFAULT_OPSET = 18
SMALL_CNN_INPUT = (3, 8, 8)
"""One sample's shape for ``small_cnn`` and ``SmallTorchCNN``."""


def seeded(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """Float32 weights from a fixed seed, so every test sees the same model."""
    return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32)


def _make_model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
                outputs: list[onnx.ValueInfoProto], weights: dict[str, np.ndarray],
                weights_as: str = "initializer", opset: int = DEFAULT_OPSET,
                name: str = "test") -> onnx.ModelProto:
    """A model whose ``weights`` are initializers, Constant nodes, or Constants behind Identity."""
    initializers = []
    front: list[onnx.NodeProto] = []
    for key, value in weights.items():
        tensor = numpy_helper.from_array(value, name=key)
        if weights_as == "initializer":
            initializers.append(tensor)
        elif weights_as == "constant":
            front.append(helper.make_node("Constant", [], [key], value=tensor, name=f"const_{key}"))
        elif weights_as == "identity":
            raw = f"{key}_raw"
            front.append(helper.make_node("Constant", [], [raw],
                                          value=numpy_helper.from_array(value, name=raw)))
            front.append(helper.make_node("Identity", [raw], [key]))
        else:
            raise ValueError(f"weights_as must be initializer, constant or identity, not {weights_as}")
    graph = helper.make_graph(front + nodes, name, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tensor_input(name: str, dims: Sequence[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))


def small_cnn(weights_as: str = "initializer", opset: int = DEFAULT_OPSET,
              batch: int | str = 1, spatial: Sequence[int | str] = (8, 8)) -> onnx.ModelProto:
    """Conv 3x3 pad 1 (3->4) -> Relu -> Conv 3x3 stride 2 pad 1 group 2 (4->4) -> Flatten -> Gemm
    (64->5, transB=1). Input (batch, 3, *spatial): pass strings for dynamic dims."""
    weights = {
        "w1": seeded((4, 3, 3, 3), 1), "b1": seeded((4,), 2),
        "w2": seeded((4, 2, 3, 3), 3), "b2": seeded((4,), 4),
        "w3": seeded((5, 64), 5), "b3": seeded((5,), 6),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1],
                         strides=[2, 2], group=2),
        helper.make_node("Flatten", ["c2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1),
    ]
    return _make_model(nodes, [tensor_input("x", [batch, 3, *spatial])],
                       [tensor_input("y", [batch, 5])], weights, weights_as, opset, "small_cnn")


def single_op(op_type: str, weight: np.ndarray, input_dims: Sequence[int | str | None],
              bias: np.ndarray | None = None, weights_as: str = "initializer",
              opset: int = DEFAULT_OPSET, weight_first: bool = False, **attrs: Any) -> onnx.ModelProto:
    """A model of one Conv/ConvTranspose/Gemm/MatMul node with a constant weight.

    ``weight_first`` puts the weight as the first operand (W @ X for MatMul, A for Gemm).
    The output's dims are left to inference.
    """
    weights = {"w": weight} if bias is None else {"w": weight, "b": bias}
    operands = ["w", "x"] if weight_first else ["x", "w"]
    inputs = operands + (["b"] if bias is not None else [])
    node = helper.make_node(op_type, inputs, ["y"], name=f"{op_type.lower()}0", **attrs)
    output = tensor_input("y", [None] * len(input_dims))
    return _make_model([node], [tensor_input("x", input_dims)], [output], weights, weights_as, opset,
                       f"{op_type.lower()}_model")


def two_activation_matmul() -> onnx.ModelProto:
    """x @ relu(x)^T style: a MatMul whose operands are both computed at run time."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Transpose", ["r"], ["rt"], name="transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "rt"], ["y"], name="attention"),
    ]
    return _make_model(nodes, [tensor_input("x", [4, 6])], [tensor_input("y", [4, 4])], {},
                       name="two_activations")


SMALL_TORCH_CNN_SOURCE = '''
import torch


class SmallTorchCNN(torch.nn.Module):
    """The torch twin of small_cnn's layout: two convs (the second strided and grouped), a Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2)
        self.fc = torch.nn.Linear(64, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        return self.fc(torch.flatten(self.conv2(x), 1))
'''


def __getattr__(name: str) -> Any:
    """Build ``SmallTorchCNN`` on first use, so that importing this module needs no torch."""
    if name != "SmallTorchCNN":
        raise AttributeError(name)
    namespace: dict[str, Any] = {"__name__": __name__}
    exec(compile(SMALL_TORCH_CNN_SOURCE, __file__, "exec"), namespace)
    cls = namespace["SmallTorchCNN"]
    globals()["SmallTorchCNN"] = cls
    return cls
