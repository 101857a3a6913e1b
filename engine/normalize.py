"""Normalize an imported ONNX model: check it, convert its opset, fix its input shape, infer shapes.

Each step is a small function over one ``onnx.ModelProto`` (like the onnx library itself);
``normalize`` chains them. Extraction then reads weights and attributes from the result and
the input size of every layer from its inferred ``value_info``.
"""

from __future__ import annotations

import os

import onnx
from onnx import external_data_helper, shape_inference, version_converter

from specprof.engine.errors import InputShapeError, ModelLoadError
from specprof.engine.types import TARGET_OPSET

# Opset 18 is what torch's ONNX exporter writes by default, what onnxruntime has supported
# for years, and the version_converter's adapters up to it are well exercised. Nothing we
# extract changed meaning across opsets (Conv/ConvTranspose/Gemm/MatMul attributes are stable
# since opset 11), so one fixed target mainly gives shape inference a single set of rules.

# Protobuf refuses to serialize one message over 2 GiB; the checker, shape inference and the
# version converter all serialize the model, so a bigger model must keep its data outside.
PROTOBUF_LIMIT = 2**31 - 1

_SHAPE_HINT = "pass --input-shape C,H,W (or FEATURES) that the model accepts"


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset of the default ONNX domain ('' or 'ai.onnx'); 0 if it declares none."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def check_opset(model: onnx.ModelProto) -> None:
    """Refuse a default-domain opset newer than the installed onnx knows (e.g. 99): no
    converter or shape inference can read it, and guessing would extract the wrong thing."""
    opset = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ModelLoadError(f"the model declares ONNX opset {opset}, newer than the newest "
                             f"this onnx {onnx.__version__} knows ({newest})",
                             "upgrade onnx (pip install -U onnx), or check the file")


def has_external_data(model: onnx.ModelProto) -> bool:
    """True if some tensor of ``model`` still lives in an external file (not loaded)."""
    return any(external_data_helper.uses_external_data(tensor)
               for tensor in external_data_helper._get_all_tensors(model))


def check_model(model: onnx.ModelProto, *, path: str | os.PathLike[str] | None = None,
                skip_unsupported: bool = False) -> list[str]:
    """Run ``onnx.checker`` and turn its complaint into a one-line ``ModelLoadError``.

    A model whose data stays in external files is checked from its ``path`` (the checker then
    finds the data files next to it, and the proto never has to hold the data). With
    ``skip_unsupported`` a rejection is a warning and the caller goes on.
    """
    try:
        if path is not None and has_external_data(model):
            onnx.checker.check_model(os.fspath(path))
        elif model.ByteSize() > PROTOBUF_LIMIT:
            raise ModelLoadError(
                "the ONNX model object is over 2 GB, more than one protobuf message can hold",
                "save it with onnx.save_model(model, path, save_as_external_data=True) and "
                "profile the file",
            )
        else:
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if skip_unsupported:
            return [f"onnx.checker rejected the model ({first}); going on (--skip-unsupported)"]
        raise ModelLoadError(
            f"the ONNX model is invalid ({first})",
            "re-export the model, check it with python -m onnx.checker, or pass "
            "--skip-unsupported to profile the layers that can be extracted",
        ) from error
    return []


def convert_opset(model: onnx.ModelProto, target: int = TARGET_OPSET) -> tuple[onnx.ModelProto, list[str]]:
    """Convert the default-domain opset to ``target``; on failure keep the model as it is.

    A failed conversion is only a warning: extraction reads attributes that have the same
    meaning in every opset we meet, and shape inference works on the original opset too.
    """
    current = default_opset(model)
    if current == target or current == 0:
        return model, []
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as error:  # the converter raises bare RuntimeError/ValueError/C++ errors
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return model, [f"kept opset {current}: conversion to opset {target} failed ({reason})"]
    return converted, []


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: old exporters also list initializers among the graph inputs."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _dims(value: onnx.ValueInfoProto) -> list[int | None] | None:
    """The dims of a tensor value (None for a symbolic one), or None if its rank is unknown."""
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim]


def set_input_shape(model: onnx.ModelProto, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """Give the first graph input the dims (batch, *input_shape); batch is 1 unless fixed.

    Stale shapes of intermediate values are dropped so that inference recomputes them for the
    new size instead of reporting a conflict.
    """
    inputs = _graph_inputs(model)
    if not inputs:
        raise InputShapeError("the model has no graph input to give a shape to",
                              "drop --input-shape for this model")
    model = _copy(model)
    value = next(v for v in model.graph.input if v.name == inputs[0].name)
    dims = _dims(value)
    wanted = len(input_shape) + 1
    if dims is not None:
        expected = "(" + ",".join("?" if d is None else str(d) for d in dims[1:]) + ")"
        if len(dims) != wanted:
            raise InputShapeError(
                f"input shape {_text(input_shape)} has {len(input_shape)} dims but the model's "
                f"input '{value.name}' takes {len(dims) - 1} after the batch: {expected}",
                f"pass --input-shape with {len(dims) - 1} numbers",
            )
        if dims[1] is not None and dims[1] != input_shape[0]:
            raise InputShapeError(
                f"input shape {_text(input_shape)} has {input_shape[0]} channels but the model's "
                f"input '{value.name}' takes {dims[1]}: {expected}",
                f"pass --input-shape {dims[1]},...",
            )
    batch = dims[0] if dims is not None and dims[0] is not None else 1
    shape = value.type.tensor_type.shape
    shape.ClearField("dim")
    for size in (batch, *input_shape):
        shape.dim.add().dim_value = int(size)
    del model.graph.value_info[:]
    for output in model.graph.output:  # keep the rank (the checker wants one), forget sizes
        for dim in output.type.tensor_type.shape.dim:
            dim.ClearField("dim_value")
    return model


def infer_shapes(model: onnx.ModelProto, *, strict: bool = True) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes`` with data propagation (so Reshape sizes resolve)."""
    return shape_inference.infer_shapes(model, check_type=False, strict_mode=strict, data_prop=True)


def normalize(
    model: onnx.ModelProto, input_shape: tuple[int, ...] | None = None, *,
    path: str | os.PathLike[str] | None = None, skip_unsupported: bool = False,
) -> tuple[onnx.ModelProto, list[str]]:
    """Check, convert to ``TARGET_OPSET``, apply ``input_shape`` and infer shapes.

    Returns the normalized model (a new object; ``model`` is not modified) and warnings.
    Raises ``ModelLoadError`` for an invalid model (a warning instead with
    ``skip_unsupported``) and ``InputShapeError`` for an input shape the model cannot take.
    ``path`` is the file ``model`` was read from; it is needed when the model's data was left
    in external files (over 2 GB): every step then works on the small proto without the data.
    """
    check_opset(model)
    rejected = check_model(model, path=path, skip_unsupported=skip_unsupported)
    model, converted = convert_opset(model)
    warnings = rejected + converted
    if input_shape is not None:
        model = set_input_shape(model, tuple(int(d) for d in input_shape))
    strict = not rejected  # a model the checker rejected gets the lenient inference at once
    try:
        return infer_shapes(model, strict=strict), warnings
    except Exception as error:  # onnx raises InferenceError, or RuntimeError from C++
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if input_shape is not None and not skip_unsupported:
            raise InputShapeError(
                f"the model cannot take input shape {_text(input_shape)} ({reason})", _SHAPE_HINT
            ) from error
        # Without a user shape a strict failure is often an op inference does not know (a
        # custom domain); the non-strict pass still gives every shape it can.
        warnings.append(f"shape inference was incomplete ({reason})")
        try:
            return infer_shapes(model, strict=False), warnings
        except Exception as again:
            if not skip_unsupported:
                raise ModelLoadError(f"shape inference failed ({reason})",
                                     "pass --skip-unsupported to go on without shapes") from again
            warnings.append("going on without inferred shapes (--skip-unsupported)")
            return model, warnings


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _text(shape: tuple[int, ...]) -> str:
    return ",".join(str(d) for d in shape)
