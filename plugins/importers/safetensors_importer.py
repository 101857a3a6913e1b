"""safetensors checkpoints, weights only: one ``.safetensors`` file, or a folder of shards.

A folder's shards are those ``model.safetensors.index.json`` names, else every
``*.safetensors`` file in it. Tensors are read one at a time through memory mapping
(``specprof.engine.tensor_files``); floating ones become float32 matrix layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from specprof.engine import hookimpl
from specprof.engine.base import ImportOptions, WeightsImporter
from specprof.engine.errors import ModelLoadError
from specprof.engine.tensor_files import looks_like_safetensors, safetensors_tensors, shard_files
from specprof.engine.types import WeightTensor

ADAPTER_CONFIG = "adapter_config.json"


class SafetensorsImporter(WeightsImporter):
    """A safetensors file or a folder of shards (F32, F16, BF16, F64)."""

    name: ClassVar[str] = "safetensors"
    description: ClassVar[str] = ("safetensors checkpoints, weights only: a file or a folder "
                                  "of shards (F32/F16/BF16/F64)")
    framework: ClassVar[str] = "safetensors"
    requires: ClassVar[tuple[str, ...]] = ("safetensors",)
    suffixes: ClassVar[tuple[str, ...]] = (".safetensors",)

    def sniff(self, path: Path, head: bytes) -> bool:
        if path.is_dir():
            # A LoRA adapter folder holds safetensors too: the lora importer reads it.
            return not (path / ADAPTER_CONFIG).is_file() and bool(shard_files(path))
        return looks_like_safetensors(head)

    def load_weights(self, path: Path, options: ImportOptions) -> Iterator[WeightTensor]:
        files = shard_files(path) if path.is_dir() else [path]
        if not files:
            raise ModelLoadError(f"{path} holds no .safetensors file",
                                 "point at a .safetensors file or a folder of shards")
        for file in files:
            yield from safetensors_tensors(file)


@hookimpl
def specprof_register_importers() -> list[type]:
    return [SafetensorsImporter]
