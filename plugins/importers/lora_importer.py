"""LoRA/PEFT adapters: the spectrum of each adapted module's update, never its dense matrix.

An adapter folder holds ``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``) and
``adapter_model.safetensors`` with, per module, ``lora_A`` (r x n) and ``lora_B`` (m x r).
The update is ``scale * B @ A`` with ``scale = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).
With the thin QR factorizations B = Q_B R_B and A^T = Q_A R_A,

    scale * B @ A = Q_B (scale * R_B @ R_A^T) Q_A^T,

and Q_B, Q_A have orthonormal columns, so the update's nonzero singular values are those of
the r x r core ``scale * R_B @ R_A^T``: O((m + n) r^2) work, never the m x n product. The
layer is that core (every backend then computes the right values); its other min(m, n) - r
singular values are 0, as the note says.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from specprof.engine import hookimpl
from specprof.engine.base import ImportOptions, WeightsImporter
from specprof.engine.errors import ModelLoadError
from specprof.engine.tensor_files import read_safetensor, safetensors_header
from specprof.engine.types import WeightTensor

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PAIRS = ((".lora_A.", ".lora_B."), (".lora_embedding_A", ".lora_embedding_B"))
_PREFIX = "base_model.model."


def lora_scale(config: dict[str, Any]) -> float:
    """PEFT's scaling of the update: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    rank, alpha = float(config.get("r", 8)), float(config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def update_core(b: np.ndarray, a: np.ndarray, scale: float) -> np.ndarray:
    """The r x r matrix with the nonzero singular values of ``scale * b @ a`` (b: m x r,
    a: r x n), from thin QR factorizations."""
    b64, a64 = np.asarray(b, dtype=np.float64), np.asarray(a, dtype=np.float64)
    r_b = np.linalg.qr(b64).R  # thin QR: Q is m x r, R is r x r
    r_a = np.linalg.qr(a64.T).R
    return scale * (r_b @ r_a.T)


def _read_core(path: Path, name_b: str, name_a: str, scale: float, embedding: bool
               ) -> np.ndarray:
    b, a = read_safetensor(path, name_b), read_safetensor(path, name_a)
    if embedding:  # PEFT's embedding update is (B @ A)^T, with A: r x vocab, B: dim x r
        b, a = a.T, b.T
    return update_core(b, a, scale)


class LoraImporter(WeightsImporter):
    """A PEFT LoRA adapter folder: one layer per adapted module (its update's spectrum)."""

    name: ClassVar[str] = "lora"
    description: ClassVar[str] = ("LoRA/PEFT adapter folder: the spectrum of each update "
                                  "scale * B @ A, from QR factors")
    framework: ClassVar[str] = "peft"
    requires: ClassVar[tuple[str, ...]] = ("safetensors",)

    def sniff(self, path: Path, head: bytes) -> bool:
        return path.is_dir() and (path / CONFIG).is_file()

    def load_weights(self, path: Path, options: ImportOptions) -> Iterator[WeightTensor]:
        folder = path if path.is_dir() else path.parent
        config = self._config(folder)
        weights = folder / WEIGHTS
        if not weights.is_file():
            raise ModelLoadError(f"{folder} has no {WEIGHTS}",
                                 "save the adapter with save_pretrained (safetensors)")
        scale = lora_scale(config)
        header, _ = safetensors_header(weights)
        for name_a in header:
            for marker_a, marker_b in _PAIRS:
                if marker_a not in name_a:
                    continue
                name_b = name_a.replace(marker_a, marker_b)
                if name_b not in header:
                    raise ModelLoadError(f"{weights} has {name_a} but no {name_b}",
                                         "check that the adapter file is complete")
                yield self._update(weights, header, name_a, name_b, marker_a, scale)

    @staticmethod
    def _config(folder: Path) -> dict[str, Any]:
        try:
            config = json.loads((folder / CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ModelLoadError(f"cannot read {folder / CONFIG} ({error})",
                                 "check the adapter's config file") from error
        if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise ModelLoadError(f"{folder} is not a LoRA adapter (peft_type "
                                 f"{config.get('peft_type') if isinstance(config, dict) else '?'})",
                                 "only LoRA adapters are read")
        return config

    @staticmethod
    def _update(weights: Path, header: dict[str, Any], name_a: str, name_b: str,
                marker_a: str, scale: float) -> WeightTensor:
        embedding = "embedding" in marker_a
        rank, n = header[name_a]["shape"]
        m, _ = header[name_b]["shape"]
        if embedding:
            m, n = n, m
        module = name_a.split(marker_a)[0]
        module = module[len(_PREFIX):] if module.startswith(_PREFIX) else module
        note = (f"LoRA update {scale:g} * B @ A, {m} x {n} of rank <= {rank}: singular values "
                f"of its {rank} x {rank} QR core; the other {max(min(m, n) - rank, 0)} are 0")
        return WeightTensor(name=module, shape=(rank, rank), dtype=header[name_a]["dtype"],
                            floating=True, note=note, always_layer=True,
                            read=partial(_read_core, weights, name_b, name_a, scale, embedding))


@hookimpl
def specprof_register_importers() -> list[type]:
    return [LoraImporter]
