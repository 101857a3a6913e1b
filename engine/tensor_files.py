"""Reading named tensors out of safetensors files, one at a time and memory-mapped.

Shared by the safetensors and LoRA importers (a plugin never imports another plugin). The
``safetensors`` library reads every dtype numpy has; bfloat16, which numpy lacks, is read
from the memory-mapped file as uint16 and widened to float32 exactly (a bf16 number is the
top half of a float32).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from specprof.engine.errors import ModelLoadError, printable
from specprof.engine.types import WeightTensor

FLOATING = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
            "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
"""Bytes per element of each safetensors dtype."""
_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the JSON header
INDEX_NAME = "model.safetensors.index.json"


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets) and
    the byte offset where the data starts."""
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelLoadError(f"{path} is too short to be a safetensors file",
                                     "check that the file is complete")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER:
                raise ModelLoadError(f"{path} is not a safetensors file (header length {length})",
                                     "pass --format to pick another importer")
            header = json.loads(handle.read(length))
    except OSError as error:
        raise ModelLoadError(f"cannot read {path} ({error.strerror})",
                             "check the file's permissions") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{path} is not a safetensors file (its header is not JSON)",
                             "pass --format to pick another importer") from error
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} is not a safetensors file", "pass --format NAME")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        if not _valid_entry(entry):
            raise ModelLoadError(f"{path}: the header entry of tensor {printable(repr(name))} is "
                                 "malformed", "check that the file is a complete safetensors file")
    return header, 8 + length


def _check_extent(path: Path, name: str, entry: dict[str, Any], data_size: int) -> None:
    """Refuse a header that lies: a tensor whose bytes do not match its dtype and shape, or lie
    past the end of the file (checked when the tensor is read, before anything is allocated)."""
    shown = printable(repr(name))
    itemsize = ITEMSIZE.get(entry["dtype"])
    if itemsize is None:
        raise ModelLoadError(f"{path}: tensor {shown} has the unknown dtype "
                             f"{printable(repr(entry['dtype']))}",
                             f"safetensors dtypes are {', '.join(sorted(ITEMSIZE))}")
    begin, end = entry["data_offsets"]
    expected = math.prod(entry["shape"]) * itemsize
    if end - begin != expected:
        raise ModelLoadError(f"{path}: tensor {shown} declares {end - begin} bytes, but its "
                             f"shape {entry['shape']} of {entry['dtype']} needs {expected}",
                             "the header lies about the tensor's size: the file is damaged")
    if end > data_size:
        raise ModelLoadError(f"{path}: tensor {shown} ends at byte {end} of the data, past the "
                             f"file's {max(data_size, 0)} bytes", "check that the file is complete")


def _valid_entry(entry: Any) -> bool:
    """dtype, shape and data_offsets as the format defines them."""
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    return (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)
            and isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(n, int) and n >= 0 for n in offsets) and offsets[0] <= offsets[1])


def looks_like_safetensors(head: bytes) -> bool:
    """A safetensors file starts with the little-endian length of a JSON header, then '{'."""
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= _MAX_HEADER and head[8:9] == b"{"


def read_safetensor(path: Path, name: str) -> np.ndarray:
    """One tensor of ``path``: floating ones as float32, others as stored."""
    header, data_start = safetensors_header(path)
    entry = header[name]
    _check_extent(path, name, entry, path.stat().st_size - data_start)
    dtype, shape = entry["dtype"], tuple(entry["shape"])
    if dtype == "BF16":
        begin, end = entry["data_offsets"]
        if (end - begin) != 2 * math.prod(shape) or data_start + end > path.stat().st_size:
            raise ModelLoadError(f"tensor {name} of {path} is truncated or malformed",
                                 "check that the file is complete")
        raw = np.memmap(path, dtype="<u2", mode="r", offset=data_start + begin,
                        shape=((end - begin) // 2,))
        bits = raw.astype(np.uint32)  # the float32 result's memory, shifted in place:
        bits <<= 16  # no second temporary of the tensor's float32 size
        return bits.view(np.float32).reshape(shape)
    if dtype.startswith("F8"):
        raise ModelLoadError(f"tensor {name} of {path} is {dtype}, which specprof cannot read yet",
                             "convert the checkpoint to bf16 or fp16")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            array = handle.get_tensor(name)
    except Exception as error:  # safetensors raises its own SafetensorError kinds
        raise ModelLoadError(f"cannot read tensor {name} of {path} ({error})",
                             "check that the file is complete") from error
    return array.astype(np.float32, copy=False) if dtype in FLOATING else array


def safetensors_tensors(path: Path, note: str = "") -> Iterator[WeightTensor]:
    """The tensors of one safetensors file in storage order, each read when asked."""
    header, _ = safetensors_header(path)
    entries = sorted(header.items(), key=lambda item: item[1].get("data_offsets", [0])[0])
    for name, entry in entries:
        dtype = str(entry.get("dtype", "?"))
        yield WeightTensor(name=name, shape=tuple(int(n) for n in entry.get("shape", ())),
                           dtype=dtype, floating=dtype in FLOATING,
                           read=partial(read_safetensor, path, name),
                           note=_join(note, f"stored as {dtype}" if dtype != "F32" else ""))


def shard_files(folder: Path) -> list[Path]:
    """The safetensors shards of a folder: those the index names, in its order, else every
    ``*.safetensors`` file sorted by name."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (OSError, json.JSONDecodeError) as error:
            raise ModelLoadError(f"cannot read {index} ({error})",
                                 "check the index file, or delete it to read every shard") from error
        files = list(dict.fromkeys(weight_map.values()))
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise ModelLoadError(f"{index} names shard(s) that are missing: {', '.join(missing[:3])}",
                                 "download every shard of the checkpoint")
        return [folder / name for name in files]
    return sorted(folder.glob("*.safetensors"))


def _join(*notes: str) -> str:
    return "; ".join(note for note in notes if note)
