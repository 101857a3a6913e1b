"""The values that flow through the pipeline: layers, requests, spectra.

All are frozen dataclasses. Arrays inside them are made read-only on construction so that
a ``Layer`` or ``Spectrum`` can be shared between threads and cached without copies.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Literal, overload

import numpy as np

from specprof.engine.errors import SpecprofError

OpType = Literal["Conv", "ConvTranspose", "Gemm", "MatMul"]
Boundary = Literal["zeros", "circular"]
SpectrumKind = Literal["operator", "filter"]
CONV_OPS = ("Conv", "ConvTranspose")
TARGET_OPSET = 18
"""The ONNX opset every model is converted to before extraction (importers export to it)."""
MATRIX_OPS = ("Gemm", "MatMul")


def _frozen(array: np.ndarray | None) -> np.ndarray | None:
    if array is None:
        return None
    # A private copy: freezing must not lock the caller's own array.
    array = np.array(array, order="C", copy=True)
    array.flags.writeable = False
    return array


def _hash_array(digest: Any, array: np.ndarray | None) -> None:
    if array is None:
        digest.update(b"none")
        return
    digest.update(str(array.dtype).encode())
    digest.update(json.dumps(array.shape).encode())
    # The array's own buffer, not a bytes copy: a checkpoint's matrices are hundreds of MB.
    digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


@dataclass(frozen=True, eq=False)
class Layer:
    """One linear operation of a model, with everything needed to build its linear map.

    Weight layouts follow ONNX:
    - ``Conv``: (c_out, c_in / groups, k_1, ..., k_d)
    - ``ConvTranspose``: (c_in, c_out / groups, k_1, ..., k_d)
    - ``Gemm`` / ``MatMul``: normalized to the (out_features, in_features) matrix M of the
      map x -> M x applied to one input vector (Gemm's transA/transB and alpha folded in).

    ``pads`` is ONNX's (begin_1, ..., begin_d, end_1, ..., end_d), with ``auto_pad`` already
    resolved. ``input_shape`` is (c_in, n_1, ..., n_d) for convolutions and (in_features,) for
    matrices; None when neither shape inference nor the user could say.
    """

    name: str
    op_type: OpType
    weight: np.ndarray
    bias: np.ndarray | None = None
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    groups: int = 1
    output_padding: tuple[int, ...] = ()
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    index: int = 0
    node_name: str = ""
    padding_mode: Boundary = "zeros"
    """How the model pads the input: ``zeros`` (ONNX Conv), or ``circular`` where a
    ``Pad(mode="wrap")`` feeds the convolution (then ``pads`` are the wrap amounts)."""
    note: str = ""
    """How the layer was read when that matters: dequantized, fused QKV, folded BatchNorm.
    Not part of ``content_hash``: it describes the source, not the map."""
    block: int | None = None
    """The transformer block the layer belongs to, read from its name (``layers.12.``);
    None when the name has none. Not part of ``content_hash``, like the name."""
    role: str = ""
    """What the layer does in its block, read from its name by ``engine.naming``: one of
    ``ROLES`` (q, k, v, qkv, o, up, gate, down, embedding, head, other), or '' when unknown."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", _frozen(np.asarray(self.weight)))
        object.__setattr__(self, "bias", _frozen(None if self.bias is None else np.asarray(self.bias)))
        if self.is_conv:
            d = self.spatial_dims
            object.__setattr__(self, "strides", tuple(self.strides) or (1,) * d)
            object.__setattr__(self, "dilations", tuple(self.dilations) or (1,) * d)
            object.__setattr__(self, "pads", tuple(self.pads) or (0,) * (2 * d))
            object.__setattr__(self, "output_padding", tuple(self.output_padding) or (0,) * d)

    @property
    def is_conv(self) -> bool:
        return self.op_type in CONV_OPS

    @property
    def spatial_dims(self) -> int:
        return self.weight.ndim - 2 if self.is_conv else 0

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:]) if self.is_conv else ()

    @property
    def in_channels(self) -> int:
        if self.op_type == "Conv":
            return int(self.weight.shape[1]) * self.groups
        if self.op_type == "ConvTranspose":
            return int(self.weight.shape[0])
        return int(self.weight.shape[1])

    @property
    def out_channels(self) -> int:
        if self.op_type == "Conv":
            return int(self.weight.shape[0])
        if self.op_type == "ConvTranspose":
            return int(self.weight.shape[1]) * self.groups
        return int(self.weight.shape[0])

    @property
    def input_size(self) -> int | None:
        """Dimension of the layer's input space (one sample), or None if unknown."""
        return None if self.input_shape is None else math.prod(self.input_shape)

    @property
    def output_size(self) -> int | None:
        return None if self.output_shape is None else math.prod(self.output_shape)

    @cached_property
    def content_hash(self) -> str:
        """sha256 of everything that determines this layer's spectra (not its name).

        Computed once per layer (the store, dedupe and the model hash all ask for it)."""
        digest = hashlib.sha256()
        digest.update(self.op_type.encode())
        _hash_array(digest, self.weight)
        _hash_array(digest, self.bias)
        params = [self.strides, self.pads, self.dilations, self.groups, self.output_padding,
                  self.input_shape, self.padding_mode]
        digest.update(json.dumps(params).encode())
        return digest.hexdigest()

    @cached_property
    def weight_hash(self) -> str:
        digest = hashlib.sha256()
        _hash_array(digest, self.weight)
        return digest.hexdigest()

    def describe(self) -> str:
        """A short human description, e.g. 'Conv 3x3 s2 g4 16->32 @8x8'."""
        if not self.is_conv:
            return f"{self.op_type} {self.in_channels}->{self.out_channels}"
        parts = [self.op_type, "x".join(map(str, self.kernel_shape))]
        if any(s != 1 for s in self.strides):
            parts.append("s" + "x".join(map(str, self.strides)))
        if any(d != 1 for d in self.dilations):
            parts.append("d" + "x".join(map(str, self.dilations)))
        if self.groups != 1:
            parts.append(f"g{self.groups}")
        if self.padding_mode != "zeros":
            parts.append(self.padding_mode)
        parts.append(f"{self.in_channels}->{self.out_channels}")
        if self.input_shape is not None:
            parts.append("@" + "x".join(map(str, self.input_shape[1:])))
        return " ".join(parts)


@dataclass(frozen=True)
class WeightTensor:
    """One named tensor of a weights-only checkpoint, before it becomes a ``Layer``.

    ``shape`` and ``dtype`` are known without reading the data, so that the engine can decide
    what is a layer (and list the rest as skipped) before anything is loaded; ``read`` returns
    the values (float32 for floating tensors), once, when the layer is built.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    """The stored type as the format names it: ``F32``, ``BF16``, ``Q4_K``, ``I64``, ..."""
    floating: bool
    read: Callable[[], np.ndarray]
    note: str = ""
    """How the tensor was read (dequantized from Q4_K, a LoRA update's core, ...)."""
    always_layer: bool = False
    """A layer even when a side is below 2 (a rank-1 LoRA update's 1 x 1 core)."""


@dataclass(frozen=True)
class SkippedNode:
    """A node that looked linear but is not profiled, and why."""

    name: str
    op_type: str
    reason: str


@dataclass(frozen=True)
class Request:
    """What the user asked of a backend, independent of the layer."""

    boundary: Boundary = "zeros"
    device: str = "cpu"
    top_k: int | None = None
    precision: Literal["float64", "float32"] = "float64"
    max_dense: int = 4096
    keep_vectors: bool = True
    prefer: tuple[str, ...] = ()
    """Backend names ``auto`` tries first, in this order, where they support the layer."""
    max_memory: int | None = None
    """Bytes one layer's computation may take (``Backend.memory``); None: no limit."""
    max_seconds: float | None = None
    """Estimated seconds (``Backend.cost``) an approximate backend may take on one layer;
    None: no limit. Exact backends are limited by memory only."""

    IDENTITY: ClassVar[tuple[str, ...]] = ("boundary", "top_k", "precision")
    """The fields that change a result: a stored spectrum is found again by these."""

    def params(self) -> dict[str, Any]:
        """The parameters that change a result (used in the spectrum's identity)."""
        return {name: getattr(self, name) for name in self.IDENTITY}


DEVICES = ("cpu", "cuda", "auto")


def resolve_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` as given; ``auto`` -> ``cuda`` where torch sees a GPU,
    else ``cpu``. Called once per request, so every backend sees the same device."""
    name = device.strip().lower()
    if name == "auto":
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if name in ("cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise SpecprofError(f"unknown device '{device}'", "use --device cpu, cuda, cuda:N or auto")


@dataclass(frozen=True)
class Support:
    """Answer to 'can you do this?': truthy when yes, with the reason when not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok

    @classmethod
    def yes(cls, reason: str = "") -> Support:
        return cls(True, reason)

    @classmethod
    def no(cls, reason: str) -> Support:
        return cls(False, reason)


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Singular values of one layer from one backend.

    ``values`` are descending; ``multiplicities`` (same length, positive integers) say how often
    each value occurs, so a 1x1 convolution on a 56x56 input need not store 3136 copies. None
    means every value occurs once. ``kind`` keeps operator spectra and filter SVDs apart.
    """

    values: np.ndarray
    kind: SpectrumKind
    backend: str
    exact: bool
    multiplicities: np.ndarray | None = None
    boundary: Boundary | None = None
    left_vectors: np.ndarray | None = None
    upper_bound: float | None = None
    lower_bound: float | None = None
    seconds: float = 0.0
    device: str = "cpu"
    params: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    complete: bool = True
    """False when ``values`` are only the largest singular values (a top-k or norm-only
    answer): then ``sigma_min`` and ``stable_rank`` are unknown (NaN, stored as null) rather
    than wrong."""

    def __post_init__(self) -> None:
        values = np.asarray(self.values, dtype=np.float64).ravel()
        mult = self.multiplicities
        order = np.argsort(-values, kind="stable")
        values = values[order]
        if mult is not None:
            mult = np.asarray(mult, dtype=np.int64).ravel()[order]
            if mult.shape != values.shape or (mult < 1).any():
                raise ValueError("multiplicities must be positive and match values")
        object.__setattr__(self, "values", _frozen(values))
        object.__setattr__(self, "multiplicities", _frozen(mult))
        object.__setattr__(self, "left_vectors", _frozen(self.left_vectors))

    @property
    def n_values(self) -> int:
        return int(self.values.size if self.multiplicities is None else self.multiplicities.sum())

    @property
    def sigma_max(self) -> float:
        return float(self.values[0]) if self.values.size else math.nan

    @property
    def sigma_min(self) -> float:
        """The smallest singular value; NaN when unknown (no values, or a partial spectrum)."""
        return float(self.values[-1]) if self.values.size and self.complete else math.nan

    @property
    def frobenius(self) -> float:
        """sqrt(sum of sigma^2) over the values held (a lower bound when not complete)."""
        weights = 1 if self.multiplicities is None else self.multiplicities
        return float(np.sqrt(np.sum(weights * self.values**2)))

    @property
    def stable_rank(self) -> float:
        """||A||_F^2 / ||A||_2^2; NaN when unknown (a partial spectrum lacks the Frobenius norm)."""
        top = self.sigma_max
        return float(self.frobenius**2 / top**2) if top > 0 and self.complete else math.nan

    def expanded(self) -> np.ndarray:
        """All singular values, descending, each repeated by its multiplicity."""
        if self.multiplicities is None:
            return self.values.copy()
        return np.repeat(self.values, self.multiplicities)


class StreamedLayers(Sequence[Layer]):
    """The layers of a weights-only checkpoint, each built from its tensor when asked for.

    Nothing is kept between two requests for a layer: iterating holds one tensor's values at
    a time, so profiling a checkpoint needs memory for its largest matrix, not for all of
    them. A layer's hashes are computed the first time it is built and kept (64 bytes each),
    so the store's repeated requests for them do not hash the weights again.
    """

    def __init__(self, build: Callable[[int], Layer], sizes: Sequence[int]) -> None:
        self._build = build
        self._sizes = tuple(int(size) for size in sizes)
        self._hashes: dict[int, tuple[str, str]] = {}

    def __len__(self) -> int:
        return len(self._sizes)

    @overload
    def __getitem__(self, index: int) -> Layer: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[Layer, ...]: ...

    def __getitem__(self, index: int | slice) -> Layer | tuple[Layer, ...]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        position = range(len(self))[index]  # IndexError for out-of-range positions
        layer = self._build(position)
        hashes = self._hashes.get(position)
        if hashes is None:
            hashes = self._hashes[position] = (layer.content_hash, layer.weight_hash)
        # cached_property keeps its value in the instance dict: seed it with the known hashes.
        vars(layer).update(content_hash=hashes[0], weight_hash=hashes[1])
        return layer

    def __iter__(self) -> Iterator[Layer]:
        return (self[position] for position in range(len(self)))

    @property
    def n_params(self) -> int:
        """Parameters of all the layers, from their shapes (nothing is read)."""
        return sum(self._sizes)


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model after import, normalization and extraction: what the rest of the engine sees."""

    name: str
    format: str
    """The importer that read it (``onnx``, ``torch``, ...)."""
    framework: str
    opset: int
    layers: Sequence[Layer]
    """A tuple, or for weights-only checkpoints ``StreamedLayers`` (built one at a time)."""
    skipped: tuple[SkippedNode, ...] = ()
    warnings: tuple[str, ...] = ()
    source: str = ""
    proto: Any = None
    """The normalized ``onnx.ModelProto`` (None once dropped to save memory)."""

    @property
    def n_params(self) -> int:
        if isinstance(self.layers, StreamedLayers):
            return self.layers.n_params
        return sum(int(layer.weight.size) + (0 if layer.bias is None else int(layer.bias.size))
                   for layer in self.layers)

    @cached_property
    def content_hash(self) -> str:
        """sha256 over the layers' content: a re-export with identical weights hashes the same."""
        digest = hashlib.sha256()
        for layer in self.layers:
            digest.update(layer.content_hash.encode())
        return digest.hexdigest()
