"""The TFLite importer: ``.tflite`` flatbuffers, converted to ONNX by tf2onnx's ``from_tflite``.

Float16 weights come out as float16 initializers behind a ``Cast``; int8 weights (dynamic-range
or full-integer quantization) as int8 initializers behind ``DequantizeLinear``, which the
engine's weight resolver folds back to float. TFLite graphs are channels-last like Keras: each
graph input of rank 3 or more is given a channels-first twin (a ``Transpose`` in front), so
that ``input_shape`` is (C, H, W) here as everywhere. tensorflow, tf2onnx and onnx are imported
inside functions only (the converter helpers are ``specprof.engine.tf_convert``'s).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specprof.engine import hookimpl
from specprof.engine.base import Importer, ImportOptions
from specprof.engine.errors import ModelLoadError
from specprof.engine.tf_convert import (
    check_converted,
    first_line,
    import_tf2onnx,
    inputs_channels_first,
    quiet_tensorflow,
)
from specprof.engine.types import TARGET_OPSET

if TYPE_CHECKING:
    import onnx

TFLITE_MAGIC = b"TFL3"
"""The flatbuffer file identifier, at bytes 4..8 of every .tflite file."""


def unconvertible_ops(path: Path) -> list[str]:
    """TFLite ops in the file that tf2onnx has no handler for (empty if it cannot tell).

    tf2onnx fails on such ops with an unrelated IndexError or KeyError; reading the file's
    operator table first lets the error name them. This uses tf2onnx's own flatbuffer
    reader and handler registry, which are internal: if they move, the check is skipped.
    """
    try:
        import tf2onnx.tflite_handlers  # noqa: F401  (registers the TFLite handlers)
        from tf2onnx.handler import tf_op
        from tf2onnx.tflite.Model import Model
        from tf2onnx.tflite_utils import lookup_enum
    except ImportError:
        return []
    try:
        model = Model.GetRootAsModel(bytearray(path.read_bytes()), 0)
        names = []
        for index in range(model.OperatorCodesLength()):
            code = model.OperatorCodes(index)
            name = lookup_enum(code.DeprecatedBuiltinCode(), "BuiltinOperator")
            if name == "PLACEHOLDER_FOR_GREATER_OP_CODES":
                name = lookup_enum(code.BuiltinCode(), "BuiltinOperator")
            if name == "CUSTOM":
                name = code.CustomCode().decode()
            names.append(name)
        known = {op for table in tf_op.get_opsets().values() for ops in table for op in ops}
    except (AttributeError, IndexError, KeyError, ValueError, UnicodeDecodeError, struct.error):
        # A damaged table: from_tflite then fails on it and says so.
        return []
    # Select-TF ("Flex") ops carry a TensorFlow op that tf2onnx converts by its TF name.
    return sorted({name for name in names
                   if f"TFL_{name}" not in known and name not in known
                   and name.removeprefix("Flex") not in known})


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
        with quiet_tensorflow():
            unknown = unconvertible_ops(path)
        if unknown:
            raise ModelLoadError(
                f"{path}: tf2onnx cannot convert the TFLite op(s) {', '.join(unknown)}",
                "export the model without them (e.g. a non-streaming variant without "
                "resource variables), or convert it to ONNX another way and profile the .onnx",
            )
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
