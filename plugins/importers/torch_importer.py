"""The PyTorch importer: modules, TorchScript files, exported programs (.pt2) and state_dicts.

Everything becomes ONNX through ``torch.onnx.export``, except a state dict without
``--model-class``: that is read weights only (each floating tensor a matrix layer, as for
safetensors). State dicts are always read with ``torch.load(weights_only=True)``: a
checkpoint is untrusted input and a full unpickle could run arbitrary code. torch is imported inside functions only, so that listing plugins or
reading ONNX files never pays for it.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from specprof.engine import hookimpl
from specprof.engine.archives import check_zip
from specprof.engine.base import ImportOptions, WeightsImporter
from specprof.engine.errors import InputShapeError, MissingExtraError, ModelLoadError, printable
from specprof.engine.types import TARGET_OPSET, WeightTensor

if TYPE_CHECKING:  # onnx is imported when a model is converted, not when listed
    import onnx

ArchiveKind = Literal["torchscript", "exported_program", "state_dict"]
_ZIP_MAGIC = b"PK\x03\x04"
# Keys under which training scripts commonly nest the weights in a checkpoint dict.
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")
_SHAPE_HINT = "pass --input-shape C,H,W (or FEATURES for a fully connected model)"


def archive_kind(path: Path) -> ArchiveKind | None:
    """What a torch zip archive holds, from its member names (torch 2.x layouts).

    ``torch.jit.save`` writes ``<root>/constants.pkl`` and ``<root>/code/``;
    ``torch.export.save`` writes ``<root>/archive_format`` and ``<root>/models/*.json``;
    ``torch.save`` writes ``<root>/data.pkl`` alone. None when it is none of these.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    members = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if "archive_format" in members or any(m.startswith("models/") and m.endswith(".json") for m in members):
        return "exported_program"
    if "constants.pkl" in members or any(m.startswith("code/") for m in members):
        return "torchscript"
    if "data.pkl" in members:
        return "state_dict"
    return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's warnings and progress prints; failures still raise."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _export_module(module: Any, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """ONNX of an ``nn.Module``/``ScriptModule`` on a batch of one input of ``input_shape``.

    The TorchScript-based exporter (dynamo=False) is tried first: it takes a fraction of a
    second, where the dynamo exporter takes one or more. The dynamo exporter is the fallback
    for modules the tracer cannot handle.
    """
    was_training = module.training
    module.eval()  # export inference behaviour (BatchNorm statistics, no dropout)
    try:
        return _export_eval_module(module, input_shape)
    finally:
        module.train(was_training)  # the caller's module is left as it was


def _export_eval_module(module: Any, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """ONNX of an eval-mode module: the TorchScript exporter (fast), else the dynamo one.

    A module with circular padding goes to the dynamo exporter first: it writes
    ``Pad(mode="wrap")``, which the extractor folds into a circular layer, where the
    TorchScript exporter writes Slice/Concat chains that lose the structure.
    """
    import torch

    example = (torch.zeros(1, *input_shape),)

    def torchscript() -> onnx.ModelProto:
        import onnx

        buffer = io.BytesIO()
        # The TorchScript exporter writes to any file object; its annotation names paths only.
        target: Any = buffer
        torch.onnx.export(module, example, target, dynamo=False, opset_version=TARGET_OPSET,
                          external_data=False)
        return onnx.load_from_string(buffer.getvalue())

    def dynamo() -> onnx.ModelProto:
        return _model_proto(torch.onnx.export(module, example, dynamo=True,
                                              opset_version=TARGET_OPSET, external_data=False,
                                              verbose=False))

    exporters = [("TorchScript exporter", torchscript), ("dynamo exporter", dynamo)]
    if any(getattr(m, "padding_mode", "zeros") == "circular" for m in module.modules()):
        exporters.reverse()
    errors = []
    with _quiet(), torch.no_grad():
        for label, export in exporters:
            try:
                return export()
            except Exception as error:  # the exporters raise many kinds; the next one decides
                errors.append(f"{label}: {_first_line(error)}")
    raise ModelLoadError(
        f"torch.onnx.export failed on input shape {tuple(input_shape)} ({'; '.join(errors)})",
        "check --input-shape, or export the model to ONNX yourself and profile the .onnx file",
    )


def _export_program(program: Any) -> onnx.ModelProto:
    """ONNX of a ``torch.export.ExportedProgram`` (only the dynamo exporter takes those)."""
    import torch

    try:
        with _quiet():
            result = torch.onnx.export(program, dynamo=True, opset_version=TARGET_OPSET,
                                       external_data=False, verbose=False)
    except Exception as error:
        raise ModelLoadError(
            f"torch.onnx.export failed on the exported program ({_first_line(error)})",
            "export the model to ONNX yourself and profile the .onnx file",
        ) from error
    return _model_proto(result)


def _model_proto(program: Any) -> onnx.ModelProto:
    """The ModelProto of what the dynamo exporter returned (it returns an ONNXProgram)."""
    if program is None:
        raise ModelLoadError("torch.onnx.export returned no ONNX program",
                             "export the model to ONNX yourself and profile the .onnx file")
    return program.model_proto


def _class_from_spec(spec: str) -> type:
    """The class named by ``package.module:Class``."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ModelLoadError(f"--model-class '{spec}' is not of the form package.module:Class",
                             "write it as package.module:Class, e.g. mymodels.nets:ResNet")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except ImportError as error:
        raise ModelLoadError(f"cannot import module '{module_name}' for --model-class ({error})",
                             "make the module importable (install it or add its folder to PYTHONPATH)"
                             ) from error
    except AttributeError as error:
        raise ModelLoadError(f"module '{module_name}' has no '{attribute}' (--model-class)",
                             "check the class name after the colon") from error
    if not isinstance(target, type):
        raise ModelLoadError(f"--model-class '{spec}' is not a class", "name an nn.Module subclass")
    return target


def _tensor_mapping(obj: Any) -> Mapping[str, Any] | None:
    """``obj`` as a state_dict (name -> tensor), looking inside common checkpoint dicts."""
    import torch

    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, Mapping):
        for key in _CHECKPOINT_KEYS:
            inner = _tensor_mapping(obj.get(key)) if key in obj else None
            if inner is not None:
                return inner
    return None


def check_torch_zip(path: Path) -> None:
    """Refuse an archive torch should not open (``specprof.engine.archives.check_zip``): every
    member of a torch 2.x archive lies under one root folder."""
    hint = "re-save it with torch.save, torch.jit.save or torch.export.save"
    names = check_zip(path, "PyTorch archive", hint=hint).names
    root = names[0].split("/", 1)[0] + "/" if names and "/" in names[0] else ""
    foreign = [name for name in names if not root or not name.startswith(root) or name == root]
    if foreign:
        raise ModelLoadError(f"{path} holds the member {printable(repr(foreign[0]))}, which a "
                             "PyTorch archive never has (all lie in one root folder)", hint)


def _load_state_dict(path: Path) -> Mapping[str, Any]:
    """The tensors of a state_dict file, read with ``weights_only=True`` (never running code)."""
    import pickle

    import torch

    check_torch_zip(path)

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelLoadError(
            f"{path} holds pickled Python objects that safe loading (weights_only=True) refuses",
            "save model.state_dict() instead, or use torch.jit.save / torch.export.save",
        ) from error
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise ModelLoadError(f"{path} is not a readable PyTorch file ({_first_line(error)})",
                             "check that the file is complete") from error
    state_dict = _tensor_mapping(loaded)
    if state_dict is None:
        raise ModelLoadError(f"{path} holds a {type(loaded).__name__}, not a state_dict of tensors",
                             "save model.state_dict() with torch.save")
    return state_dict


def _tensor_values(tensor: Any) -> Any:
    """A tensor as a NumPy array: floating ones as float32 (bfloat16 included)."""
    if tensor.is_floating_point():
        return tensor.detach().float().numpy()
    return tensor.detach().numpy()


def _load_state_dict_module(path: Path, model_class: str | None) -> Any:
    import torch

    if not model_class:
        raise ModelLoadError(
            f"{path} holds a state_dict (weights only), so the model's class is needed to rebuild it",
            "pass --model-class package.module:Class (a class constructible with no arguments)",
        )
    state_dict = _load_state_dict(path)
    cls = _class_from_spec(model_class)
    try:
        module = cls()
    except TypeError as error:
        raise ModelLoadError(f"cannot build {model_class} with no arguments ({error})",
                             "give the class defaults for all its constructor arguments") from error
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"--model-class {model_class} is not a torch.nn.Module",
                             "name an nn.Module subclass")
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ModelLoadError(
            f"the weights in {path} do not fit {model_class} ({_first_line(error)})",
            "check that --model-class is the class the state_dict was saved from",
        ) from error
    return module


class TorchImporter(WeightsImporter):
    """PyTorch models: nn.Module objects, TorchScript, torch.export (.pt2) and state_dicts
    (weights only, or rebuilt with ``--model-class``)."""

    name = "torch"
    description = ("PyTorch: nn.Module, TorchScript, torch.export .pt2, state_dict (weights "
                   "only, or a graph with --model-class)")
    framework = "pytorch"
    requires = ("torch", "onnxscript")
    extra = "torch"
    suffixes = (".pt", ".pth", ".pt2", ".ts")

    def reads_weights(self, path: Path, options: ImportOptions) -> bool:
        return (not options.model_class and Path(path).is_file()
                and archive_kind(Path(path)) == "state_dict")

    def load_weights(self, path: Path, options: ImportOptions) -> Iterator[WeightTensor]:
        if not self.available():
            raise MissingExtraError("PyTorch models", "torch")
        for name, tensor in _load_state_dict(path).items():
            dtype = str(tensor.dtype).removeprefix("torch.")
            yield WeightTensor(name=name, shape=tuple(tensor.shape), dtype=dtype,
                               floating=bool(tensor.is_floating_point()),
                               note="" if dtype == "float32" else f"stored as {dtype}",
                               read=partial(_tensor_values, tensor))

    def sniff(self, path: Path, head: bytes) -> bool:
        return head.startswith(_ZIP_MAGIC) and archive_kind(path) is not None

    def accepts(self, obj: Any) -> bool:
        torch = sys.modules.get("torch")  # an object of torch's can only exist if torch is loaded
        if torch is None:
            return False
        return isinstance(obj, torch.nn.Module | torch.export.ExportedProgram)

    def load(self, source: Path | Any, options: ImportOptions) -> onnx.ModelProto:
        if not self.available():
            raise MissingExtraError("PyTorch models", "torch")
        import torch

        if not isinstance(source, Path | str):
            if isinstance(source, torch.export.ExportedProgram):
                return _export_program(source)
            return _export_module(source, self._input_shape(options, "a PyTorch module"))
        path = Path(source)
        kind = archive_kind(path)
        if kind is None:
            raise ModelLoadError(
                f"{path} is not a PyTorch archive (torch.save, torch.jit.save or torch.export.save)",
                "re-save it with torch>=1.6, or pass --format to pick another importer",
            )
        check_torch_zip(path)
        if kind == "exported_program":
            try:
                with _quiet():
                    program = torch.export.load(path)
            except Exception as error:  # torch raises several kinds for a damaged archive
                raise ModelLoadError(f"cannot read the exported program {path} ({_first_line(error)})",
                                     "re-save it with torch.export.save") from error
            return _export_program(program)
        if kind == "torchscript":
            try:
                with _quiet():  # torch 2.13 marks TorchScript deprecated; the files still load
                    module = torch.jit.load(path, map_location="cpu")
            except Exception as error:
                raise ModelLoadError(f"cannot read the TorchScript file {path} ({_first_line(error)})",
                                     "re-save it with torch.jit.save") from error
            return _export_module(module, self._input_shape(options, "a TorchScript model"))
        module = _load_state_dict_module(path, options.model_class)
        return _export_module(module, self._input_shape(options, "a model rebuilt from a state_dict"))

    @staticmethod
    def _input_shape(options: ImportOptions, what: str) -> tuple[int, ...]:
        if options.input_shape is None:
            raise InputShapeError(f"{what} needs an example input shape to be exported to ONNX",
                                  _SHAPE_HINT)
        return tuple(options.input_shape)


@hookimpl
def specprof_register_importers() -> list[type]:
    return [TorchImporter]
