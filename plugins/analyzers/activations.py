"""Each linear layer's output on real inputs, computed by onnxruntime on the normalized model.

The layers' output tensors are added as outputs of the graph, so onnxruntime computes exactly
what the model computes (no operator is re-implemented here). Inputs go through in batches and
each batch's activations are handed on and dropped before the next, so memory is bounded by one
batch whatever the number of inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from specprof.engine.errors import InputShapeError, MissingExtraError, SpecprofError
from specprof.engine.types import Layer


@dataclass(frozen=True)
class ModelInput:
    """The one runtime input of a model: its name, its per-sample shape (None: dynamic), dtype."""

    name: str
    sample_shape: tuple[int | None, ...]
    dtype: np.dtype


def model_input(proto: onnx.ModelProto) -> ModelInput:
    """The model's single data input (graph inputs that are initializers are weights)."""
    weights = {tensor.name for tensor in proto.graph.initializer}
    inputs = [value for value in proto.graph.input if value.name not in weights]
    if len(inputs) != 1:
        names = ", ".join(value.name for value in inputs) or "none"
        raise InputShapeError(f"the model has {len(inputs)} data inputs ({names}); the hypergraph "
                              "analysis feeds exactly one", "export the model with one input")
    tensor_type = inputs[0].type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                 for d in tensor_type.shape.dim)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    return ModelInput(inputs[0].name, dims[1:], dtype)


def layer_outputs(proto: onnx.ModelProto, layers: Sequence[Layer]) -> dict[str, str]:
    """Layer name -> the name of the tensor its node writes (the linear op's output)."""
    by_name = {node.name: node for node in proto.graph.node if node.name}
    by_output = {node.output[0]: node for node in proto.graph.node if node.output}
    found = {}
    for layer in layers:
        node = by_name.get(layer.node_name) if layer.node_name else None
        node = node or by_output.get(layer.name)
        if node is None:
            raise SpecprofError(f"layer {layer.name} is not a node of the model's graph",
                                "load the model again with specprof.load_model")
        found[layer.name] = node.output[0]
    return found


def with_outputs(proto: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``proto`` whose graph also outputs ``tensors`` (typed where shapes are known)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    present = {value.name for value in model.graph.output}
    typed = {value.name: value for value in model.graph.value_info}
    for name in tensors:
        if name in present:
            continue
        value = onnx.ValueInfoProto()
        if name in typed:
            value.CopyFrom(typed[name])
        else:
            value.name = name
        model.graph.output.append(value)
        present.add(name)
    return model


def make_session(proto: onnx.ModelProto, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for ``proto``."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise MissingExtraError("the hypergraph analysis (onnxruntime)", "hypergraph") from error
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers are noise here
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(proto.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own untyped errors for bad graphs
        raise SpecprofError(f"onnxruntime cannot run the model: {str(error).splitlines()[0]}",
                            "check that the model runs in onnxruntime") from error


class ActivationRunner:
    """Runs a model on batches and returns the chosen layers' outputs for each batch."""

    def __init__(self, proto: onnx.ModelProto, layers: Sequence[Layer],
                 threads: int | None = None) -> None:
        self.input = model_input(proto)
        self.tensors = layer_outputs(proto, layers)
        self.session = make_session(with_outputs(proto, self.tensors.values()), threads)
        self._names = list(dict.fromkeys(self.tensors.values()))

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Layer name -> output array (batch axis first) for one batch ``x``."""
        try:
            outputs = self.session.run(self._names, {self.input.name: x.astype(self.input.dtype)})
        except Exception as error:  # onnxruntime's errors are untyped; say what was fed
            raise InputShapeError(
                f"onnxruntime failed on inputs of shape {tuple(x.shape)}: "
                f"{str(error).splitlines()[0]}",
                "check that the inputs fit the model's input") from error
        by_tensor = dict(zip(self._names, outputs, strict=True))
        return {layer: by_tensor[tensor] for layer, tensor in self.tensors.items()}

    def stream(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]
               ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """(labels, activations) per batch; nothing is kept from one batch to the next."""
        for x, y in batches:
            yield y, self.run(x)
