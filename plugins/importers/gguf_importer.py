"""GGUF files (llama.cpp), weights only, through the ``gguf`` library.

Tensors are memory-mapped by ``gguf.GGUFReader`` and dequantized one at a time with gguf's own
``gguf.quants.dequantize`` (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K and every other type it
knows), so the spectra are those of exactly what llama.cpp computes with. GGUF lists a
tensor's dimensions innermost first; the matrix is (rows, columns) = reversed.
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from specprof.engine import hookimpl
from specprof.engine.base import ImportOptions, WeightsImporter
from specprof.engine.errors import MissingExtraError, ModelLoadError, printable
from specprof.engine.types import WeightTensor

MAGIC = b"GGUF"
_INTEGER_TYPES = ("I8", "I16", "I32", "I64")
_PLAIN_TYPES = ("F32",)


def _dequantized(tensor: Any, shape: tuple[int, ...]) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        raise ModelLoadError(f"gguf cannot dequantize {tensor.name} ({tensor.tensor_type.name})",
                             "upgrade the gguf package: pip install -U gguf") from error
    except (ValueError, IndexError) as error:
        raise ModelLoadError(f"tensor {printable(repr(tensor.name))} cannot be dequantized "
                             f"({printable(str(error)[:200])})",
                             "the file is damaged: its data does not fit the tensor") from error
    values = np.asarray(values, dtype=np.float32)
    if values.size != math.prod(shape):
        raise ModelLoadError(f"tensor {printable(repr(tensor.name))} holds {values.size} values, "
                             f"but its shape {shape} needs {math.prod(shape)}",
                             "the header lies about the tensor's shape: the file is damaged")
    return values.reshape(shape)


GGUF_TENSOR_INFO_BYTES = 24
"""Fewest bytes a GGUF tensor description takes (name length, dims count, type, offset)."""
GGUF_KV_BYTES = 13
"""Fewest bytes a GGUF metadata entry takes (key length, value type, one byte of value)."""


def check_gguf_counts(path: Path) -> None:
    """Refuse a GGUF header whose tensor or metadata counts cannot fit in the file, before the
    reader allocates for them."""
    with path.open("rb") as handle:
        head = handle.read(24)
    if len(head) < 24 or not head.startswith(MAGIC):
        raise ModelLoadError(f"{path} is not a GGUF file (too short, or no GGUF magic)",
                             "check that the file is complete")
    version, tensors, entries = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise ModelLoadError(f"{path} is GGUF version {version}; specprof reads versions 2 and 3",
                             "convert it with a current llama.cpp (convert_hf_to_gguf.py)")
    if tensors * GGUF_TENSOR_INFO_BYTES + entries * GGUF_KV_BYTES > path.stat().st_size:
        raise ModelLoadError(f"{path} declares {tensors} tensors and {entries} metadata "
                             "entries, more than the file can hold",
                             "the header is damaged or the file is truncated")


class GgufImporter(WeightsImporter):
    """A GGUF file: float and quantized tensors, dequantized by gguf."""

    name: ClassVar[str] = "gguf"
    description: ClassVar[str] = ("GGUF (llama.cpp) files, weights only: F32/F16/BF16 and "
                                  "quantized types dequantized by gguf")
    framework: ClassVar[str] = "gguf"
    requires: ClassVar[tuple[str, ...]] = ("gguf",)
    extra: ClassVar[str | None] = "gguf"
    suffixes: ClassVar[tuple[str, ...]] = (".gguf",)

    def sniff(self, path: Path, head: bytes) -> bool:
        return head.startswith(MAGIC)

    def load_weights(self, path: Path, options: ImportOptions) -> Iterator[WeightTensor]:
        if not self.available():
            raise MissingExtraError("GGUF files", "gguf")
        from gguf import GGUFReader

        check_gguf_counts(path)
        try:
            with warnings.catch_warnings():  # NumPy overflow warnings on a damaged header
                warnings.simplefilter("ignore")
                reader = GGUFReader(path)
        except (ValueError, OSError, KeyError, IndexError, TypeError, OverflowError,
                UnicodeDecodeError, struct.error, MemoryError) as error:
            # gguf parses the header with NumPy views; a damaged one fails in any of these
            raise ModelLoadError(f"{path} is not a readable GGUF file ({type(error).__name__}: "
                                 f"{printable(str(error)[:200])})",
                                 "check that the file is complete") from error
        size = path.stat().st_size
        for tensor in reader.tensors:
            if int(tensor.data_offset) + int(tensor.n_bytes) > size:
                raise ModelLoadError(f"{path}: tensor {printable(repr(tensor.name))} ends past "
                                     f"the end of the file ({size} bytes)",
                                     "the header lies about the tensor's size or offset, or "
                                     "the file is truncated")
        for tensor in reader.tensors:
            kind = tensor.tensor_type.name
            shape = tuple(int(n) for n in reversed(list(tensor.shape)))
            note = "" if kind in _PLAIN_TYPES else f"quantization {kind} (dequantized by gguf)"
            yield WeightTensor(name=tensor.name, shape=shape, dtype=kind,
                               floating=kind not in _INTEGER_TYPES, note=note,
                               read=partial(_dequantized, tensor, shape))


@hookimpl
def specprof_register_importers() -> list[type]:
    return [GgufImporter]
