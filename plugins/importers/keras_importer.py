"""The Keras/TensorFlow importer: ``.keras`` files, legacy HDF5 ``.h5``/``.hdf5``, SavedModel
folders, and ``keras.Model`` objects, converted to ONNX by tf2onnx.

Layout: Keras works channels-last (N, H, W, C); ONNX and the rest of specprof work
channels-first. The model is wrapped in a ``tf.function`` that takes a channels-first input
and transposes it, so tf2onnx emits NCHW ``Conv`` nodes whose weights are already
(c_out, c_in/groups, kh, kw) and the graph input is (N, C, H, W): the user's
``input_shape`` is (C, H, W) for every framework. Inputs of rank 2 (features) are passed as
they are.

What the converter does on the way (TensorFlow's grappler, which tf2onnx always runs):
an inference-mode BatchNormalization right after a convolution is folded into that
convolution's weights, as torch's ONNX exporter does in eval mode. SeparableConv2D becomes
two ``Conv`` nodes (depthwise, group = C, then pointwise 1x1), DepthwiseConv2D a grouped
``Conv``, Conv2DTranspose a ``ConvTranspose``, Dense a ``MatMul``.

tensorflow, tf2onnx and onnx are imported inside functions only (tensorflow takes seconds to
import); the converter helpers shared with the TFLite importer are in
``specprof.engine.tf_convert``.
"""

from __future__ import annotations

import contextlib
import re
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specprof.engine import hookimpl
from specprof.engine.archives import check_zip
from specprof.engine.base import Importer, ImportOptions
from specprof.engine.errors import InputShapeError, ModelLoadError
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

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"
KERAS_MEMBERS = frozenset({"metadata.json", "config.json", "model.weights.h5",
                           "model.weights.npz", "assets/"})
"""What ``model.save('x.keras')`` writes (Keras 3), besides files under ``assets/``."""
_SHAPE_HINT = "pass --input-shape C,H,W (channels first, as for every framework)"


def _channels_last(shape: Sequence[int | None]) -> tuple[int | None, ...]:
    """(C, *spatial) -> (*spatial, C)."""
    return (*shape[1:], shape[0])


def _channels_first(shape: Sequence[int | None]) -> tuple[int | None, ...]:
    """(*spatial, C) -> (C, *spatial)."""
    return (shape[-1], *shape[:-1])


def _signature(tf: Any, specs: Sequence[Any], input_shape: tuple[int, ...] | None) -> list[Any]:
    """Channels-first ``TensorSpec``s of the model's inputs; ``input_shape`` fixes the first.

    ``specs`` are the model's own (channels-last) input specs, batch included.
    """
    signature = []
    for position, spec in enumerate(specs):
        shape = list(spec.shape)
        sample = shape[1:]
        if position == 0 and input_shape is not None:
            if len(input_shape) != len(sample):
                raise InputShapeError(
                    f"input shape {input_shape} has {len(input_shape)} dims but the model's input "
                    f"takes {len(sample)} after the batch (channels first: "
                    f"{_channels_first(sample) if len(sample) >= 2 else tuple(sample)})",
                    _SHAPE_HINT,
                )
            wanted = _channels_last(input_shape) if len(sample) >= 2 else tuple(input_shape)
            for have, want in zip(sample, wanted, strict=True):
                if have is not None and have != want:
                    raise InputShapeError(
                        f"input shape {input_shape} does not fit the model's input "
                        f"{_channels_first(sample) if len(sample) >= 2 else tuple(sample)} "
                        "(channels first, '?' = any)".replace("None", "?"),
                        _SHAPE_HINT,
                    )
            sample = list(wanted)
        first = _channels_first(sample) if len(sample) >= 2 else tuple(sample)
        name = re.sub(r"[^A-Za-z0-9_]", "_", getattr(spec, "name", None) or f"input_{position}")
        signature.append(tf.TensorSpec((shape[0], *first), spec.dtype, name=name))
    return signature


def convert_callable(call: Any, specs: Sequence[Any], input_shape: tuple[int, ...] | None,
                     name: str) -> onnx.ModelProto:
    """ONNX of ``call(*inputs)`` (a Keras model or a SavedModel signature) on channels-first inputs.

    Each input of rank 3 or more is transposed back to channels-last inside the traced
    function; tf2onnx's transpose optimizer then pushes the transposes through the graph.
    """
    tf, tf2onnx = import_tf2onnx("Keras/TensorFlow models", "keras")
    signature = _signature(tf, specs, input_shape)

    def to_channels_last(x: Any) -> Any:
        rank = len(x.shape)
        return x if rank < 3 else tf.transpose(x, [0, *range(2, rank), 1])

    @tf.function(input_signature=signature)
    def channels_first(*inputs: Any) -> Any:
        return call(*[to_channels_last(x) for x in inputs])

    try:
        with quiet_tensorflow():
            model, _ = tf2onnx.convert.from_function(channels_first, input_signature=signature,
                                                     opset=TARGET_OPSET)
    except (ValueError, TypeError, RuntimeError, NotImplementedError, KeyError) as error:
        raise ModelLoadError(f"{name}: tf2onnx could not convert the model ({first_line(error)})",
                             "check that the model runs in TensorFlow on this input shape") from error
    model.graph.name = name
    return check_converted(model, name)


def _keras_error(path: Path, error: BaseException) -> ModelLoadError:
    """A one-line error for a file Keras refuses, naming the layer class when it is custom."""
    text = str(error)
    match = (re.search(r"Unknown (?:layer|object|class)[^'\"]*['\"]([^'\"]+)['\"]", text)
             or re.search(r"Could not locate (?:class|function) ['\"]([^'\"]+)['\"]", text))
    if match:
        return ModelLoadError(
            f"{path}: the model uses the custom layer '{match.group(1)}', which Keras cannot rebuild "
            "without its code",
            "load the model in Python with custom_objects={...} and pass the keras.Model to "
            "specprof.load_model, or save it with standard layers only",
        )
    return ModelLoadError(f"{path} is not a Keras model Keras can load ({first_line(error)})",
                          "check that the file is complete and was saved by Keras (model.save)")


def _is_keras_zip(path: Path) -> bool:
    """A Keras 3 ``.keras`` archive holds config.json and model.weights.h5."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
    return "config.json" in names and "model.weights.h5" in names


def _keras_member(name: str) -> bool:
    """Whether a member name belongs in a Keras 3 ``.keras`` archive."""
    return name in KERAS_MEMBERS or name.startswith("assets/")


@contextlib.contextmanager
def _keras_suffixed(path: Path) -> Iterator[Path]:
    """``path``, or a link to it named with the suffix its content calls for.

    Keras 3 picks its reader by suffix alone; a file recognized by content (HDF5 magic, a
    .keras zip) under another name is read through a temporary link.
    """
    if path.suffix.lower() in KerasImporter.suffixes:
        yield path
        return
    with path.open("rb") as handle:
        suffix = ".h5" if handle.read(len(HDF5_MAGIC)) == HDF5_MAGIC else ".keras"
    with tempfile.TemporaryDirectory(prefix="specprof-keras-") as folder:
        link = Path(folder, "model" + suffix)
        link.symlink_to(path.resolve())
        yield link


class KerasImporter(Importer):
    """Keras models (.keras, .h5/.hdf5, SavedModel folders, keras.Model objects) via tf2onnx."""

    name = "keras"
    description = ("Keras/TensorFlow models: .keras, legacy HDF5 .h5/.hdf5, SavedModel folders, "
                   "keras.Model objects (via tf2onnx)")
    framework = "keras"
    suffixes = (".keras", ".h5", ".hdf5")
    requires = ("tensorflow", "tf2onnx")
    extra = "keras"

    def sniff(self, path: Path, head: bytes) -> bool:
        if path.is_dir():
            return (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()
        if head.startswith(HDF5_MAGIC):
            return True
        return head.startswith(_ZIP_MAGIC) and _is_keras_zip(path)

    def accepts(self, obj: Any) -> bool:
        # A Keras model can only exist if keras (or tensorflow) is loaded: no import needed.
        classes = [module.Model for module in (sys.modules.get("keras"),)
                   if module is not None and hasattr(module, "Model")]
        tf = sys.modules.get("tensorflow")
        if tf is not None and hasattr(tf, "keras"):
            with contextlib.suppress(AttributeError, ImportError):
                classes.append(tf.keras.Model)
        return bool(classes) and isinstance(obj, tuple(classes))

    def load(self, source: Path | Any, options: ImportOptions) -> onnx.ModelProto:
        if isinstance(source, str | Path) and Path(source).is_file():
            with Path(source).open("rb") as handle:
                head = handle.read(len(_ZIP_MAGIC))
            if head.startswith(_ZIP_MAGIC):  # checked before TensorFlow is even imported
                check_zip(Path(source), "Keras archive", _keras_member,
                          "save the model again with model.save('model.keras')")
        tf, _ = import_tf2onnx("Keras/TensorFlow models", "keras")
        if not isinstance(source, str | Path):
            return self._from_model(source, options, getattr(source, "name", "keras_model"))
        path = Path(source)
        if path.is_dir():
            return self._from_saved_model(tf, path, options)
        try:
            with quiet_tensorflow(), _keras_suffixed(path) as readable:
                model = tf.keras.models.load_model(str(readable), compile=False)
        except (ValueError, TypeError, OSError, KeyError, AttributeError) as error:
            raise _keras_error(path, error) from error
        return self._from_model(model, options, path.stem)

    def _from_model(self, model: Any, options: ImportOptions, name: str) -> onnx.ModelProto:
        inputs = getattr(model, "inputs", None)
        if not inputs:
            raise ModelLoadError(
                f"the Keras model '{name}' has no defined inputs (a subclassed model never called)",
                "build it first (model.build((None, H, W, C)) or call it once), or use keras.Input",
            )

        def call(*tensors: Any) -> Any:
            return model(list(tensors) if len(tensors) > 1 else tensors[0], training=False)

        return convert_callable(call, inputs, options.input_shape, name)

    def _from_saved_model(self, tf: Any, path: Path, options: ImportOptions) -> onnx.ModelProto:
        """Convert the serving signature of a SavedModel folder.

        The folder is read as a graph with its signatures (the TF1-style loader), not
        restored as Python objects: Keras-2-era SavedModels hold optimizer objects that
        ``tf.saved_model.load`` of TF 2.16+ cannot rebuild, while their graph is intact.
        """
        _, tf2onnx = import_tf2onnx("Keras/TensorFlow models", "keras")
        if not (path / "saved_model.pb").is_file():
            raise ModelLoadError(f"{path} is a folder without saved_model.pb",
                                 "pass a SavedModel folder (tf.saved_model.save) or a model file")
        try:
            with quiet_tensorflow(), tf.Graph().as_default() as graph, \
                    tf.compat.v1.Session(graph=graph) as session:
                meta = tf.compat.v1.saved_model.load(session, ["serve"], str(path))
                # "__saved_model_init_op" and the like are bookkeeping, not functions to call.
                signatures = {key: value for key, value in meta.signature_def.items()
                              if not key.startswith("__") and value.inputs}
                if not signatures:
                    raise ModelLoadError(
                        f"{path}: the SavedModel has no signatures, so there is no function to convert",
                        "save it with signatures (tf.saved_model.save(obj, path, signatures=fn)) "
                        "or export a Keras model with model.export(path)",
                    )
                key = "serving_default" if "serving_default" in signatures else sorted(signatures)[0]
                signature = signatures[key]
                inputs = [signature.inputs[k].name for k in sorted(signature.inputs)]
                outputs = [signature.outputs[k].name for k in sorted(signature.outputs)]
                frozen = tf.compat.v1.graph_util.convert_variables_to_constants(
                    session, graph.as_graph_def(), [name.split(":")[0] for name in outputs])
            with quiet_tensorflow():
                model, _ = tf2onnx.convert.from_graph_def(frozen, input_names=inputs,
                                                          output_names=outputs, opset=TARGET_OPSET)
        except (ValueError, TypeError, OSError, RuntimeError, KeyError, AttributeError,
                tf.errors.OpError) as error:
            raise ModelLoadError(f"{path} is not a SavedModel specprof can convert ({first_line(error)})",
                                 "check that the folder is complete (saved_model.pb and variables/) "
                                 "and has a 'serve' tag") from error
        model.graph.name = path.name
        return inputs_channels_first(check_converted(model, str(path)))


@hookimpl
def specprof_register_importers() -> list[type]:
    return [KerasImporter]
