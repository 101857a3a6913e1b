"""Normalize an imported ONNX model: check it, convert its opset, fix its input shape, infer shapes.

Each step is a small function over one ``onnx.ModelProto`` (like the onnx library itself);
``normalize`` chains them. Extraction then reads weights and attributes from the result and
the input size of every layer from its inferred ``value_info``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError, EncodeError
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
    return _checked(model, path, skip_unsupported)[0]


def _serialized(model: onnx.ModelProto) -> bytes:
    """The model's bytes; a ``ModelLoadError`` naming the fix if one message cannot hold it."""
    too_big = ModelLoadError(
        "the ONNX model object is over 2 GB, more than one protobuf message can hold",
        "save it with onnx.save_model(model, path, save_as_external_data=True) and "
        "profile the file",
    )
    try:
        data = model.SerializeToString()
    except (ValueError, EncodeError) as error:  # protobuf refuses over 2 GiB
        raise too_big from error
    if len(data) > PROTOBUF_LIMIT:
        raise too_big
    return data


def _checked(model: onnx.ModelProto, path: str | os.PathLike[str] | None,
             skip_unsupported: bool) -> tuple[list[str], bytes | None]:
    """``check_model``'s warnings, and the bytes it checked (None when it checked the file):
    serializing a model costs about as much as checking it (0.3 s for 100 MB), so the bytes
    go on to shape inference when nothing changed the model in between."""
    on_disk = path is not None and has_external_data(model)
    serialized = None if on_disk else _serialized(model)
    try:
        onnx.checker.check_model(serialized if serialized is not None
                                 else os.fspath(path or ""))  # on_disk: path is set
    except (onnx.checker.ValidationError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if skip_unsupported:
            return [f"onnx.checker rejected the model ({first}); going on "
                    "(--skip-unsupported)"], serialized
        raise ModelLoadError(
            f"the ONNX model is invalid ({first})",
            "re-export the model, check it with python -m onnx.checker, or pass "
            "--skip-unsupported to profile the layers that can be extracted",
        ) from error
    return [], serialized


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


def infer_shapes(model: onnx.ModelProto | bytes, *, strict: bool = True) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes`` with data propagation (so Reshape sizes resolve),
    of a model or its serialized bytes."""
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
    rejected, serialized = _checked(model, path, skip_unsupported)
    original = model
    model, converted = convert_opset(model)
    warnings = rejected + converted
    if input_shape is not None:
        model = set_input_shape(model, tuple(int(d) for d in input_shape))
    # Unchanged since the check (same opset, no new input shape): infer from its bytes.
    unchanged = serialized if model is original and serialized is not None else None
    strict = not rejected  # a model the checker rejected gets the lenient inference at once
    try:
        return infer_shapes(model if unchanged is None else unchanged, strict=strict), warnings
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
            return infer_shapes(model if unchanged is None else unchanged,
                                strict=False), warnings
        except Exception as again:
            if not skip_unsupported:
                raise ModelLoadError(f"shape inference failed ({reason})",
                                     "pass --skip-unsupported to go on without shapes") from again
            warnings.append("going on without inferred shapes (--skip-unsupported)")
            return model, warnings


# --------------------------------------------------------------------------------------------
# The normalized-model cache: import and normalize once per model content.
#
# Checking, converting and inferring shapes serialize the whole model several times: 2-4 s on
# a ResNet-50, more than the certified sigma_max of its layers. The normalized model depends
# only on the file's bytes, how it is imported and the code that does it, so it is kept on
# disk under a key made of those, and a later run reads it back (hash + parse: ~0.4 s there).

CACHE_ENV = "SPECPROF_NORMALIZE_CACHE"
"""Set to 0 (or off, no, false) to neither read nor write the normalized-model cache."""
CACHE_DIR_ENV = "SPECPROF_CACHE_DIR"
"""The cache folder; default ``$XDG_CACHE_HOME/specprof`` (~/.cache/specprof)."""

# Bump when what ``normalize`` produces, or the entry layout, changes.
CACHE_FORMAT = 1
_MAGIC = b"specprof-normalized\n"
# An external data reference has a StringStringEntryProto with key "location" (field 1,
# length 8). A file holding these bytes may read weights from other files, which its own
# hash does not cover: it is not cached (a false match only costs the cache).
_EXTERNAL_LOCATION = b"\x0a\x08location"
_DISABLED = ("0", "off", "no", "false")
_CHUNK = 1 << 24  # files are hashed and scanned in pieces of this many bytes
# Least recently used entries go first once the folder holds more than this.
DEFAULT_CACHE_BYTES = 4 << 30


def default_cache_dir() -> Path:
    """``$SPECPROF_CACHE_DIR``, else ``$XDG_CACHE_HOME/specprof``, else ``~/.cache/specprof``."""
    chosen = os.environ.get(CACHE_DIR_ENV, "")
    if chosen:
        return Path(chosen)
    cache_home = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache_home) if os.path.isabs(cache_home) else Path.home() / ".cache"
    return base / "specprof"


@dataclass(frozen=True)
class NormalizedModel:
    """A cache entry: the normalized model and the warnings its normalization gave."""

    model: onnx.ModelProto
    warnings: tuple[str, ...]


class NormalizeCache:
    """Normalized models on disk, one file per key (``key``), written atomically.

    An entry is a header (the warnings, the payload's size and CRC-32) and the serialized
    model. A reader trusts nothing: a short, damaged or unparsable entry is a miss and is
    removed, so the next run writes it again. Writers write a temporary file in the same
    folder and rename it, so concurrent runs never see half an entry (the last rename wins;
    both wrote the same model).
    """

    def __init__(self, folder: str | os.PathLike[str], max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes

    @classmethod
    def from_environment(cls) -> NormalizeCache | None:
        """The cache of ``default_cache_dir()``, or None where ``$SPECPROF_NORMALIZE_CACHE``
        turns it off."""
        if os.environ.get(CACHE_ENV, "").strip().lower() in _DISABLED:
            return None
        return cls(default_cache_dir() / "normalized")

    def key(self, path: str | os.PathLike[str], importer: str,
            options: dict[str, Any]) -> str | None:
        """The entry name for the model file ``path`` as ``importer`` reads it with
        ``options`` (anything JSON can write; they change what import/normalize give); None
        when the file cannot be cached (not a regular file)."""
        from specprof import __version__

        path = Path(path)
        if not path.is_file():
            return None
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(_CHUNK):
                digest.update(block)
        fields = {"content": digest.hexdigest(), "importer": importer,
                  "options": options, "specprof": __version__, "onnx": onnx.__version__,
                  "opset": TARGET_OPSET, "format": CACHE_FORMAT}
        text = json.dumps(fields, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    @staticmethod
    def self_contained(path: str | os.PathLike[str]) -> bool:
        """False if the file's bytes hold an external data reference: its weights may live in
        other files, which its hash does not cover, so it must not be cached. Asked before
        writing an entry only: an entry exists only for content that passed."""
        tail = b""
        with Path(path).open("rb") as handle:
            while block := handle.read(_CHUNK):
                if _EXTERNAL_LOCATION in tail + block[:len(_EXTERNAL_LOCATION)] or \
                        _EXTERNAL_LOCATION in block:
                    return False
                tail = block[-(len(_EXTERNAL_LOCATION) - 1):]
        return True

    def _entry(self, key: str) -> Path:
        return self.folder / f"{key}.onnxn"

    def get(self, key: str) -> NormalizedModel | None:
        """The entry of ``key``, or None (absent, or damaged: then it is removed)."""
        entry = self._entry(key)
        try:
            data = entry.read_bytes()
        except OSError:  # absent (the usual miss) or unreadable: either way, compute it
            return None
        found = _decode(data)
        if found is None:
            _remove(entry)
            return None
        try:
            os.utime(entry)  # recently used: pruned last
        except OSError:
            return found  # a read-only cache still serves its entries
        return found

    def put(self, key: str, model: onnx.ModelProto, warnings: list[str] | tuple[str, ...]) -> bool:
        """Store ``model`` under ``key``; False (and nothing written) if the folder cannot take
        it: the cache is an optimization, never a reason for a run to fail."""
        payload = model.SerializeToString()
        header = json.dumps({"warnings": list(warnings), "size": len(payload),
                             "crc32": zlib.crc32(payload)}).encode()
        temporary = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=".partial-")
            with os.fdopen(handle, "wb") as out:
                out.write(_MAGIC + len(header).to_bytes(8, "little") + header)
                out.write(payload)
            os.replace(temporary, self._entry(key))
        except OSError:
            if temporary is not None:
                _remove(Path(temporary))
            return False
        self.prune(keep=self._entry(key))
        return True

    def prune(self, keep: Path | None = None) -> None:
        """Remove the least recently used entries while the folder holds over ``max_bytes``,
        never ``keep`` (the entry just written, however big)."""
        try:
            entries = [(item.stat(), item) for item in self.folder.glob("*.onnxn")]
        except OSError:
            return
        total = sum(stat.st_size for stat, _ in entries)
        for stat, item in sorted(entries, key=lambda pair: pair[0].st_mtime_ns):
            if total <= self.max_bytes:
                break
            if item != keep:
                _remove(item)
                total -= stat.st_size


def _decode(data: bytes) -> NormalizedModel | None:
    """An entry's model and warnings, or None if any part of it does not check out."""
    start = len(_MAGIC) + 8
    if not data.startswith(_MAGIC) or len(data) < start:
        return None
    length = int.from_bytes(data[len(_MAGIC):start], "little")
    try:
        header = json.loads(data[start:start + length])
        payload = memoryview(data)[start + length:]
        if (not isinstance(header, dict) or len(payload) != header.get("size")
                or zlib.crc32(payload) != header.get("crc32")):
            return None
        model = onnx.ModelProto()
        model.ParseFromString(payload)
        return NormalizedModel(model, tuple(str(w) for w in header.get("warnings", ())))
    except (ValueError, TypeError, AttributeError, DecodeError):  # bad JSON, UTF-8, protobuf
        return None


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        return  # another run removed or replaced it, or the folder is read-only


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _text(shape: tuple[int, ...]) -> str:
    return ",".join(str(d) for d in shape)
