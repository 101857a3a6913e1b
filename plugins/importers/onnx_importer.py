"""The ONNX importer: reads ``.onnx`` files (and takes ``onnx.ModelProto`` objects) as they are.

External data files are read only from inside the model's own folder: a model file is
untrusted input, and a tensor location such as ``../../etc/passwd`` or ``/home/x/.ssh/key``
must not make specprof read files elsewhere.

A model whose file and data together exceed ``MAX_IN_MEMORY_BYTES`` (just under protobuf's
2 GB limit) is returned with its data left in the external files: normalization checks it
from its path and extraction reads each weight from disk once, when a layer needs it.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specprof.engine import hookimpl
from specprof.engine.base import Importer, ImportOptions
from specprof.engine.errors import ModelLoadError

# ModelProto field tags as protobuf writes them: ir_version (field 1, varint) comes first,
# followed by producer_name/version, domain, model_version, doc_string, graph, opset_import...
_IR_VERSION_TAG = 0x08
_NEXT_FIELD_TAGS = frozenset({0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0x7A})
# Below protobuf's 2 GiB message limit, with room for the graph and value_info added later.
MAX_IN_MEMORY_BYTES = 2**31 - 2**26
_HINT = "check that the file is a complete ONNX model (re-export or re-download it)"

if TYPE_CHECKING:  # onnx is imported when a model is read, not when the plugin is listed
    import onnx


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers and attribute tensors of the model and all its subgraphs."""
    from onnx import external_data_helper

    # onnx has no public walker; this private helper is the one load_external_data uses.
    return list(external_data_helper._get_all_tensors(model))


def external_data_bytes(model: onnx.ModelProto, folder: Path) -> int:
    """Size of the external data files ``model`` refers to (each file counted once)."""
    from onnx import external_data_helper

    files = {external_data_helper.ExternalDataInfo(tensor).location
             for tensor in _all_tensors(model) if external_data_helper.uses_external_data(tensor)}
    return sum((folder / location).stat().st_size for location in files)


def check_external_locations(model: onnx.ModelProto, folder: Path) -> None:
    """Refuse any external-data location that is absolute or resolves outside ``folder``.

    Symlinks and ``..`` are resolved before the comparison, so a link inside the folder that
    points outside is refused too.
    """
    from onnx import external_data_helper

    root = folder.resolve()
    for tensor in _all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        try:  # onnx checks offset and length here, raising ValueError (and warns on odd keys)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                location = external_data_helper.ExternalDataInfo(tensor).location
        except ValueError as error:
            raise ModelLoadError(f"tensor '{tensor.name}' has invalid external-data fields "
                                 f"({error})", "re-export the model with its data") from error
        if "\x00" in location:
            raise ModelLoadError(f"tensor '{tensor.name}' names an external data file with a "
                                 "NUL character", "re-export the model with its data")
        if not location or os.path.isabs(location) or Path(location).is_absolute() or location.startswith(("\\", "/")):
            raise ModelLoadError(
                f"tensor '{tensor.name}' points to external data at '{location}', an absolute or "
                "empty path; only files inside the model's folder are read",
                f"put the data file next to the model and set its location relative to {root}",
            )
        target = (root / location).resolve()
        if not target.is_relative_to(root):
            raise ModelLoadError(
                f"tensor '{tensor.name}' points to external data at '{location}', which is "
                f"outside the model's folder {root}",
                "move the data file into the model's folder and fix its location",
            )
        if not target.is_file():
            raise ModelLoadError(
                f"tensor '{tensor.name}' needs the external data file '{location}', which is missing",
                f"copy '{location}' next to the model in {root}",
            )


class OnnxImporter(Importer):
    """ONNX models, read as they are."""

    name = "onnx"
    description = "ONNX models (.onnx), external data kept inside the model's folder"
    framework = "onnx"
    suffixes = (".onnx",)

    def sniff(self, path: Path, head: bytes) -> bool:
        """A serialized ModelProto starts with its ir_version field, then another known field."""
        if len(head) < 3 or head[0] != _IR_VERSION_TAG or not 1 <= head[1] <= 0x7F:
            return False
        return head[2] in _NEXT_FIELD_TAGS

    def accepts(self, obj: Any) -> bool:
        onnx = sys.modules.get("onnx")  # an onnx object exists only where onnx was imported
        return onnx is not None and isinstance(obj, onnx.ModelProto)

    def load(self, source: Path | Any, options: ImportOptions) -> onnx.ModelProto:
        import onnx
        from google.protobuf.message import DecodeError
        from onnx import external_data_helper

        if isinstance(source, onnx.ModelProto):
            model = onnx.ModelProto()
            model.CopyFrom(source)
            if any(external_data_helper.uses_external_data(t) for t in _all_tensors(model)):
                raise ModelLoadError(
                    "the ONNX model object refers to external data that is not loaded",
                    "load it from its file, or call onnx.load_external_data_for_model first",
                )
            return model
        path = Path(source)
        if not path.is_file():  # a directory, FIFO or socket: never open (a FIFO would block)
            kind = "a directory" if path.is_dir() else "not a regular file"
            raise ModelLoadError(f"{path} is {kind}, not an ONNX model file",
                                 "pass the .onnx file itself")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except (DecodeError, ValueError, RuntimeError) as error:
            reason = str(error).strip() or type(error).__name__
            raise ModelLoadError(f"{path} is not a valid ONNX model ({reason})", _HINT) from error
        if not model.HasField("graph") or model.ir_version <= 0:
            raise ModelLoadError(f"{path} is not a valid ONNX model (no graph or IR version)", _HINT)
        check_external_locations(model, path.parent)
        if model.ByteSize() + external_data_bytes(model, path.parent) > MAX_IN_MEMORY_BYTES:
            return model  # too big for one protobuf message: the data stays on disk
        try:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot read the external data of {path} ({error})", _HINT) from error
        return model


@hookimpl
def specprof_register_importers() -> list[type]:
    return [OnnxImporter]
