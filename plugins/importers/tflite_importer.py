"""The TFLite importer: ``.tflite`` flatbuffers, converted to ONNX by tf2onnx's ``from_tflite``.

Float16 weights come out as float16 initializers behind a ``Cast``; int8 weights (dynamic-range
or full-integer quantization) as int8 initializers behind ``DequantizeLinear``, which the
engine's weight resolver folds back to float. TFLite graphs are channels-last like Keras: each
graph input of rank 3 or more is given a channels-first twin (a ``Transpose`` in front), so
that ``input_shape`` is (C, H, W) here as everywhere. tensorflow and tf2onnx are imported
inside functions only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from specprof.engine import hookimpl
from specprof.engine.base import Importer, ImportOptions
from specprof.engine.errors import ModelLoadError
from specprof.engine.normalize import TARGET_OPSET
from specprof.plugins.importers.keras_importer import (
    check_converted,
    first_line,
    import_tf2onnx,
    quiet_tensorflow,
)

TFLITE_MAGIC = b"TFL3"
"""The flatbuffer file identifier, at bytes 4..8 of every .tflite file."""


def inputs_channels_first(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make every channels-last graph input of rank >= 3 channels-first, in place.

    The input keeps its name (users and ``--input-shape`` see it) and gets the (N, C, *spatial)
    shape; a Transpose to (N, *spatial, C) feeds the nodes that read it.
    """
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    front = []
    for value in graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        rank = len(dims)
        if rank < 3:
            continue
        inner = f"{value.name}__channels_last"
        for node in graph.node:
            node.input[:] = [inner if name == value.name else name for name in node.input]
        front.append(helper.make_node("Transpose", [value.name], [inner],
                                      perm=[0, *range(2, rank), 1],
                                      name=f"{value.name}__to_channels_last"))
        old = [onnx.TensorShapeProto.Dimension() for _ in range(rank)]
        for copy, dim in zip(old, dims, strict=True):
            copy.CopyFrom(dim)
        reordered = [old[0], old[-1], *old[1:-1]]
        del dims[:]
        for dim in reordered:
            dims.add().CopyFrom(dim)
    if front:
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(front + nodes)
    return model


class TFLiteImporter(Importer):
    """TensorFlow Lite flatbuffers (float32, float16 and int8 weights) via tf2onnx."""

    name = "tflite"
    description = "TensorFlow Lite models (.tflite; float32, float16 and int8 weights) via tf2onnx"
    framework = "tflite"
    suffixes = (".tflite",)
    requires = ("tensorflow", "tf2onnx")
    extra = "tflite"

    def sniff(self, path: Path, head: bytes) -> bool:
        return len(head) >= 8 and head[4:8] == TFLITE_MAGIC

    def load(self, source: Path | Any, options: ImportOptions) -> onnx.ModelProto:
        if not isinstance(source, str | Path):
            raise ModelLoadError(f"the tflite importer reads .tflite files, not a {type(source).__name__}",
                                 "pass the path of the .tflite file")
        path = Path(source)
        _, tf2onnx = import_tf2onnx("TFLite models", "tflite")
        head = path.read_bytes()[:8]
        if head[4:8] != TFLITE_MAGIC:
            raise ModelLoadError(f"{path} is not a TFLite model (no 'TFL3' identifier)",
                                 "check that the file is a complete .tflite flatbuffer")
        try:
            with quiet_tensorflow():
                model, _ = tf2onnx.convert.from_tflite(str(path), opset=TARGET_OPSET)
        except Exception as error:
            # tf2onnx's flatbuffer parser raises anything from IndexError to struct.error on a
            # damaged file; all of them mean the same to the user.
            raise ModelLoadError(f"{path}: tf2onnx could not convert this TFLite model "
                                 f"({type(error).__name__}: {first_line(error)})",
                                 "check that the file is a complete .tflite flatbuffer") from error
        model.graph.name = model.graph.name or path.stem
        return inputs_channels_first(check_converted(model, str(path)))


@hookimpl
def specprof_register_importers() -> list[type]:
    return [TFLiteImporter]
