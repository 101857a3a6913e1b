"""GGUF files (llama.cpp), weights only, through the ``gguf`` library.

Tensors are memory-mapped by ``gguf.GGUFReader`` and dequantized one at a time with gguf's own
``gguf.quants.dequantize`` (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K and every other type it
knows), so the spectra are those of exactly what llama.cpp computes with. GGUF lists a
tensor's dimensions innermost first; the matrix is (rows, columns) = reversed.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from specprof.engine import hookimpl
from specprof.engine.base import ImportOptions, WeightsImporter
from specprof.engine.errors import MissingExtraError, ModelLoadError
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
    return np.asarray(values, dtype=np.float32).reshape(shape)


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

        try:
            reader = GGUFReader(path)
        except (ValueError, OSError, KeyError) as error:
            raise ModelLoadError(f"{path} is not a readable GGUF file ({error})",
                                 "check that the file is complete") from error
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
