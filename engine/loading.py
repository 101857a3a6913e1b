"""``load_model``: pick an importer, normalize the ONNX it returns, extract the layers.

This is the single entry of the import stage for the CLI and the Python API alike.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from specprof.engine.base import Importer, ImportOptions, WeightsImporter
from specprof.engine.errors import InputShapeError, MissingExtraError, ModelLoadError
from specprof.engine.extract import extract
from specprof.engine.naming import block_of, fused_note, role_of
from specprof.engine.normalize import (
    NormalizeCache,
    default_opset,
    has_external_data,
    normalize,
)
from specprof.engine.plugins import Registry, get_registry
from specprof.engine.types import Layer, LoadedModel, SkippedNode, StreamedLayers, WeightTensor

# Enough for every importer's magic bytes; the file is read once and the head shared.
_SNIFF_BYTES = 4096


def parse_input_shape(text: str) -> tuple[int, ...]:
    """'3,32,32' (or '3x32x32', '(3, 32, 32)') -> (3, 32, 32); positive integers only."""
    body = text.strip().strip("()[]").strip()
    parts = [part.strip() for part in re.split(r"[,x×\s]+", body) if part.strip()]
    if not parts or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise InputShapeError(f"input shape '{text}' is not a list of positive integers",
                              "write it as C,H,W, e.g. --input-shape 3,32,32 (or FEATURES)")
    return tuple(int(part) for part in parts)


def as_input_shape(input_shape: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """An input shape as given by a user or caller ('3,32,32', a list, a tuple) as a tuple."""
    if input_shape is None or isinstance(input_shape, tuple):
        return input_shape
    if isinstance(input_shape, str):
        return parse_input_shape(input_shape)
    return tuple(int(n) for n in input_shape)


def _registry(registry: Registry | None) -> Registry:
    return registry if registry is not None else get_registry()


def _known(registry: Registry) -> str:
    return ", ".join(sorted(registry.importers)) or "none"


def _ensure_available(importer_class: type[Importer]) -> None:
    support = importer_class.available()
    if support:
        return
    if importer_class.extra:
        raise MissingExtraError(f"{importer_class.framework} models ({importer_class.name} importer)",
                                importer_class.extra)
    raise ModelLoadError(f"the '{importer_class.name}' importer is unavailable", support.reason)


def _read_head(path: Path) -> bytes:
    """The first bytes of a model file, for sniffing; never opens a FIFO, socket or device
    (a FIFO would block, /dev/zero never ends)."""
    if path.is_dir():
        return b""
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a regular file (a FIFO, socket or device)",
                             "pass the model file itself")
    try:
        with path.open("rb") as handle:
            return handle.read(_SNIFF_BYTES)
    except OSError as error:
        raise ModelLoadError(f"cannot read {path} ({error.strerror})",
                             "check the file's permissions") from error


def choose_importer(path: Path, registry: Registry, format: str | None = None) -> Importer:
    """The importer for a file: ``format`` if given, else by suffix, else by content."""
    if format is not None:
        if format not in registry.importers:
            raise ModelLoadError(f"unknown model format '{format}'",
                                 f"--format must be one of: {_known(registry)}")
        _ensure_available(registry.importers[format])
        return registry.importers[format]()
    name = path.name.lower()
    by_suffix = [cls for cls in registry.importers.values()
                 if any(name.endswith(suffix.lower()) for suffix in cls.suffixes)]
    head = _read_head(path)
    if len(by_suffix) == 1:
        _ensure_available(by_suffix[0])
        return by_suffix[0]()
    # Several importers claim the suffix, or none does: the content decides. An importer
    # that is not installed cannot sniff (it may need its own package), so it is skipped.
    candidates = by_suffix or list(registry.importers.values())
    for cls in candidates:
        if cls.available() and cls().sniff(path, head):
            return cls()
    if by_suffix:
        _ensure_available(by_suffix[0])
        return by_suffix[0]()
    raise ModelLoadError(
        f"no importer recognizes {path} (suffix '{path.suffix or 'none'}', content unknown)",
        f"pass --format NAME, one of: {_known(registry)}",
    )


def choose_object_importer(obj: Any, registry: Registry) -> Importer:
    """The importer for an in-memory model object (an nn.Module, an onnx.ModelProto, ...)."""
    for cls in registry.importers.values():
        importer = cls()
        if importer.accepts(obj):
            _ensure_available(cls)
            return importer
    raise ModelLoadError(f"no importer accepts a {type(obj).__module__}.{type(obj).__qualname__} object",
                         f"pass a model file, or an object of a supported framework ({_known(registry)})")


CONV_KERNEL_NOTE = ("filter SVD only: the (c_out, c_in*k) unfolding of a conv kernel; "
                    "its operator spectrum needs a graph")


def with_names(layer: Layer) -> Layer:
    """``layer`` with the block and role its name says (``engine.naming``)."""
    return replace(layer, block=block_of(layer.name), role=role_of(layer.name))


def _join(*notes: str) -> str:
    return "; ".join(note for note in notes if note)


def _not_a_layer(tensor: WeightTensor) -> str:
    """Why a checkpoint tensor is not a matrix layer ('' when it is one).

    Layers are every floating tensor of two or more dimensions with both sides (rows, and
    the product of the other dimensions) at least 2."""
    shape = tensor.shape
    if not tensor.floating:
        return (f"{tensor.dtype} tensor {_shape_text(shape)}: an integer buffer, "
                "not a weight")
    if len(shape) < 2:
        return (f"{len(shape)}-D tensor {_shape_text(shape)} (a norm, bias or scale): "
                "not a matrix")
    if min(shape[0], math.prod(shape[1:])) < 2 and not tensor.always_layer:
        return f"tensor {_shape_text(shape)} has a side below 2: not a matrix"
    return ""


def tensor_layer(tensor: WeightTensor, index: int) -> Layer:
    """The matrix layer of a checkpoint tensor (one that ``_not_a_layer`` accepts).

    A tensor of more than two dimensions (a conv kernel) is unfolded to (c_out, rest), its
    filter-SVD matrix, and its note says so.
    """
    shape = tensor.shape
    rows, cols = shape[0], math.prod(shape[1:])
    role = role_of(tensor.name)
    note = _join(tensor.note, fused_note(role), CONV_KERNEL_NOTE if len(shape) > 2 else "")
    values = np.asarray(tensor.read(), dtype=np.float32).reshape(rows, cols)
    return Layer(name=tensor.name, op_type="MatMul", weight=values, input_shape=(cols,),
                 output_shape=(rows,), index=index, node_name=tensor.name, note=note,
                 block=block_of(tensor.name), role=role)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + " x ".join(map(str, shape)) + ")" if shape else "(scalar)"


def layer_tensors(tensors: Iterable[WeightTensor]
                  ) -> tuple[list[WeightTensor], list[SkippedNode]]:
    """The tensors of a checkpoint that are layers, in file order, and the others with the
    reason; decided from shapes and dtypes alone (nothing is read)."""
    layers: list[WeightTensor] = []
    skipped: list[SkippedNode] = []
    for tensor in tensors:
        reason = _not_a_layer(tensor)
        if reason:
            skipped.append(SkippedNode(tensor.name, tensor.dtype, reason))
        else:
            layers.append(tensor)
    return layers, skipped


def _load_weights_model(importer: WeightsImporter, path: Path, options: ImportOptions,
                        name: str | None) -> LoadedModel:
    tensors, skipped = layer_tensors(importer.load_weights(path, options))
    warnings = []
    if not tensors:
        warnings.append(f"{path} holds no matrix of floating weights "
                        f"({len(skipped)} tensor(s), all skipped: see 'specprof layers')")

    def build(position: int) -> Layer:
        return tensor_layer(tensors[position], position)

    layers = StreamedLayers(build, [math.prod(tensor.shape) for tensor in tensors])
    return LoadedModel(name=name or path.stem, format=importer.name,
                       framework=importer.framework, opset=0, layers=layers,
                       skipped=tuple(skipped), warnings=tuple(warnings), source=str(path),
                       proto=None)


def _object_name(obj: Any) -> str:
    if isinstance(obj, onnx.ModelProto) and obj.graph.name:
        return obj.graph.name
    return type(obj).__name__


def load_model(
    source: str | os.PathLike[str] | Any,
    *,
    format: str | None = None,
    input_shape: str | Sequence[int] | None = None,
    model_class: str | None = None,
    registry: Registry | None = None,
    name: str | None = None,
    fold_batchnorm: bool = False,
    skip_unsupported: bool = False,
) -> LoadedModel:
    """Import ``source`` (a file path or a model object), normalize it and extract its layers.

    ``input_shape`` is one sample's shape without the batch, (C, H, W) or (features,): it
    fixes a dynamic model input, and framework models need it to be exported at all.
    ``fold_batchnorm`` folds a BatchNormalization that follows a Conv/ConvTranspose/Gemm into
    its weight and bias (off by default: the layer as the model computes it is the unfolded
    one). ``skip_unsupported`` goes on with the layers that can be extracted where a node or a
    normalization step fails, listing what was lost among the warnings.
    """
    registry = _registry(registry)
    model_path: Path | None = None
    input_shape = as_input_shape(input_shape)
    options = ImportOptions(input_shape=input_shape, model_class=model_class,
                            skip_unsupported=skip_unsupported)
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.exists():
            raise ModelLoadError(f"model file {path} does not exist", "check the path")
        importer = choose_importer(path, registry, format)
        if isinstance(importer, WeightsImporter) and importer.reads_weights(path, options):
            return _load_weights_model(importer, path, options, name)
        display_name, source_text = name or path.stem, str(path)
        model_path = path
        cached = _import_normalized(importer, path, options)
        if cached is not None:
            return _loaded_model(cached[0], list(cached[1]), importer, display_name,
                                 source_text, None, input_shape, fold_batchnorm,
                                 skip_unsupported)
        proto = importer.load(path, options)
    else:
        if format is not None and format not in registry.importers:
            raise ModelLoadError(f"unknown model format '{format}'",
                                 f"--format must be one of: {_known(registry)}")
        importer = (registry.importers[format]() if format is not None
                    else choose_object_importer(source, registry))
        proto = importer.load(source, options)
        display_name, source_text = name or _object_name(source), f"<{type(source).__name__}>"
    on_disk = model_path is not None and has_external_data(proto)
    normalized, warnings = normalize(proto, input_shape, path=model_path if on_disk else None,
                                     skip_unsupported=skip_unsupported)
    return _loaded_model(normalized, warnings, importer, display_name, source_text,
                         model_path if on_disk else None, input_shape, fold_batchnorm,
                         skip_unsupported)


def _cache_options(options: ImportOptions) -> dict[str, Any]:
    return {"input_shape": options.input_shape, "skip_unsupported": options.skip_unsupported}


def _import_normalized(importer: Importer, path: Path, options: ImportOptions
                       ) -> tuple[onnx.ModelProto, tuple[str, ...]] | None:
    """Import and normalize the model file ``path`` through the normalized-model cache
    (``NormalizeCache``): the cached model when this content was normalized before with the
    same options, else the model imported and normalized now and stored for next time.

    None where the cache does not apply: turned off (``$SPECPROF_NORMALIZE_CACHE=0``), a
    ``model_class`` (its code lives outside the file), not a regular file, or a model too big
    for one protobuf message (its data stays on disk: the caller loads it that way). A file
    whose weights may live in other files is normalized here but not stored.
    """
    cache = NormalizeCache.from_environment()
    if cache is None or options.model_class is not None:
        return None
    key = cache.key(path, importer.name, _cache_options(options))
    if key is None:
        return None
    found = cache.get(key)
    if found is not None:
        return found.model, found.warnings
    proto = importer.load(path, options)
    if has_external_data(proto):
        return None  # the caller loads it again from disk, data left in its files
    normalized, warnings = normalize(proto, options.input_shape,
                                     skip_unsupported=options.skip_unsupported)
    # Stored only for content hashed again now (a file rewritten while it was imported must
    # not be filed under its old content) that holds all its weights.
    if cache.self_contained(path) and cache.key(path, importer.name,
                                                _cache_options(options)) == key:
        cache.put(key, normalized, warnings)
    return normalized, tuple(warnings)


def _loaded_model(normalized: onnx.ModelProto, warnings: list[str], importer: Importer,
                  display_name: str, source_text: str, model_path: Path | None,
                  input_shape: tuple[int, ...] | None, fold_batchnorm: bool,
                  skip_unsupported: bool) -> LoadedModel:
    """Extract the layers of a normalized model (``model_path``: its file, where its data
    stays on disk) and assemble the ``LoadedModel``."""
    on_disk = model_path is not None
    extraction = extract(normalized, fold_batchnorm=fold_batchnorm,
                         skip_unsupported=skip_unsupported,
                         base_dir=str(model_path.parent) if on_disk and model_path else "")
    layers = [with_names(replace(layer, note="; ".join(extraction.notes[layer.name]))
                         if extraction.notes.get(layer.name) else layer)
              for layer in extraction.layers]
    skipped = list(extraction.skipped)
    warnings = [*warnings, *extraction.warnings, *extraction.note_warnings()]
    if on_disk:
        warnings.append("the model's data is over 2 GB and stays in its external files: "
                        "weights were read from disk one by one")
    if input_shape is None:
        unknown = [layer.name for layer in layers if layer.is_conv and layer.input_shape is None]
        if unknown:
            warnings.append(
                f"input size unknown for {len(unknown)} convolution(s) ({', '.join(unknown[:3])}"
                f"{', ...' if len(unknown) > 3 else ''}): the model's input is dynamic; "
                "pass --input-shape C,H,W to profile their operator spectra"
            )
    return LoadedModel(
        name=display_name,
        format=importer.name,
        framework=importer.framework,
        opset=default_opset(normalized),
        layers=tuple(layers),
        skipped=tuple(skipped),
        warnings=tuple(warnings),
        source=source_text,
        proto=normalized,
    )
