"""Labelled inputs for the analyzers, read in batches so that any number of them fits in memory.

Three sources, all giving ``(x, y)`` batches (``x``: (batch, *sample_shape) float32, ``y``:
(batch,) int64):

- a NumPy ``.npz`` file with arrays ``x`` and ``y``; ``x`` is read from the archive batch by
  batch (never whole), ``y`` is small and read at once;
- a folder of images with one subfolder per class (``digits/0/a.png``, ``digits/1/b.png``):
  labels are the subfolders in sorted order; images must already have the model's size (they are
  not resized, which would change what the model sees) and are scaled to [0, 1];
- in the Python API, a pair of arrays ``(x, y)`` or any iterable of ``(x, y)`` pairs, each pair
  one sample or one batch.

Every batch is checked against the model's input shape, so a mismatch fails with a one-line
message naming the expected shape before anything is computed.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from specprof.engine.errors import InputShapeError, SpecprofError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class DataError(SpecprofError):
    """The labelled inputs are missing, unreadable, or lack labels."""


@dataclass(frozen=True)
class DataSource:
    """Labelled inputs that can be read once, in batches.

    ``n`` is the number of inputs when known up front (None for a plain iterable);
    ``class_names`` maps labels to names when the source has them (image folders).
    """

    batches: Iterable[tuple[np.ndarray, np.ndarray]]
    n: int | None
    description: str
    class_names: tuple[str, ...] = ()

    def n_batches(self, batch_size: int) -> int | None:
        return None if self.n is None else math.ceil(self.n / batch_size)


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def check_batch(x: Any, y: Any, sample_shape: tuple[int | None, ...], where: str
                ) -> tuple[np.ndarray, np.ndarray]:
    """Validate one batch against the model's input (``sample_shape`` has no batch axis)."""
    if y is None:
        raise DataError(f"labels missing in {where}",
                        "give one integer class label per input (y)")
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim == len(sample_shape) and y.ndim == 0:  # one sample, not a batch
        x, y = x[None], y[None]
    fits = x.ndim == len(sample_shape) + 1 and all(
        want is None or have == want for have, want in zip(x.shape[1:], sample_shape, strict=True))
    if not fits:
        got = _shape_text(tuple(x.shape[1:])) if x.ndim >= 1 else "a scalar"
        raise InputShapeError(
            f"inputs in {where} have shape {got} per sample, but the model expects "
            f"{_shape_text(sample_shape)}",
            f"give inputs of shape {_shape_text(sample_shape)} (batch axis first)")
    y = y.reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise DataError(f"{where} has {x.shape[0]} inputs but {y.shape[0]} labels",
                        "give exactly one label per input")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.number) and np.all(np.mod(y, 1) == 0)):
            raise DataError(f"labels in {where} are not integers ({y.dtype})",
                            "give integer class labels (0, 1, 2, ...)")
    return np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64)


# --- .npz ---------------------------------------------------------------------------------------


def _npz_member(archive: zipfile.ZipFile, key: str) -> str | None:
    names = set(archive.namelist())
    return next((name for name in (f"{key}.npy", key) if name in names), None)


def _npy_header(handle: Any, member: str = "") -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of a .npy stream, leaving it at the first data byte."""
    try:
        major, _minor = np.lib.format.read_magic(handle)
        if major == 1:
            return np.lib.format.read_array_header_1_0(handle)
        return np.lib.format.read_array_header_2_0(handle)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"array '{member}' is not a readable .npy ({error})",
                        "save the data with np.savez(path, x=inputs, y=labels)") from error


def _stream_npy(archive: zipfile.ZipFile, member: str, batch_size: int
                ) -> Iterator[np.ndarray]:
    """Rows of a C-ordered .npy inside a zip, ``batch_size`` at a time, without reading it all.

    zipfile decompresses as it reads, so this works for ``savez`` and ``savez_compressed`` alike.
    """
    with archive.open(member) as handle:
        shape, fortran, dtype = _npy_header(handle, member)
        if dtype.hasobject or dtype.kind not in "fiub":
            raise DataError(f"array '{member}' holds {dtype} values, not numbers",
                            "save numeric arrays")
        if fortran and len(shape) > 1:  # rows are not contiguous in the file
            raise DataError(f"array '{member}' is stored in Fortran order, which cannot be "
                            "read in batches", "save it with np.ascontiguousarray(x)")
        row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        for start in range(0, shape[0] if shape else 0, batch_size):
            count = min(batch_size, shape[0] - start)
            try:
                raw = handle.read(count * row * dtype.itemsize)
            except (OSError, EOFError, zipfile.BadZipFile) as error:
                raise DataError(f"array '{member}' cannot be read ({error})",
                                "check that the file is complete") from error
            if len(raw) != count * row * dtype.itemsize:
                raise DataError(f"array '{member}' is truncated: {shape[0]} rows declared, "
                                f"data ends before row {start + len(raw) // max(row * dtype.itemsize, 1)}",
                                "check that the file is complete")
            yield np.frombuffer(raw, dtype=dtype).reshape((count, *shape[1:]))


def _npy_rows(archive: zipfile.ZipFile, member: str) -> int:
    with archive.open(member) as handle:
        shape, _fortran, _dtype = _npy_header(handle, member)
    return int(shape[0]) if shape else 0


def npz_source(path: Path, sample_shape: tuple[int | None, ...], batch_size: int) -> DataSource:
    """Batches from an ``.npz`` with ``x`` (inputs, batch axis first) and ``y`` (labels)."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as error:
        raise DataError(f"cannot read {path} as a .npz archive ({error})",
                        "save the data with np.savez(path, x=inputs, y=labels)") from error
    with archive:
        x_member, y_member = _npz_member(archive, "x"), _npz_member(archive, "y")
        if x_member is None:
            raise DataError(f"{path} has no array 'x' (it has {archive.namelist()})",
                            "save the data with np.savez(path, x=inputs, y=labels)")
        if y_member is None:
            raise DataError(f"labels missing: {path} has no array 'y'",
                            "save the labels too: np.savez(path, x=inputs, y=labels)")
        n = _npy_rows(archive, x_member)
    try:  # never unpickle: an object array in a .npz could run code
        with np.load(path, allow_pickle=False) as arrays:
            labels = np.asarray(arrays["y"]).reshape(-1)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"cannot read the labels 'y' of {path} ({error})",
                        "save numeric arrays: np.savez(path, x=inputs, y=labels)") from error
    if labels.shape[0] != n:
        raise DataError(f"{path} has {n} inputs but {labels.shape[0]} labels",
                        "give exactly one label per input")

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with zipfile.ZipFile(path) as archive:
            start = 0
            for x in _stream_npy(archive, x_member, batch_size):
                y = labels[start:start + len(x)]
                start += len(x)
                yield check_batch(x, y, sample_shape, str(path))

    return DataSource(_Reiterable(batches), n, str(path))


class _Reiterable:
    """An iterable that calls a generator function afresh on each ``iter``."""

    def __init__(self, function: Any) -> None:
        self.function = function

    def __iter__(self) -> Iterator[Any]:
        return iter(self.function())


# --- image folders ------------------------------------------------------------------------------


def image_folder_source(path: Path, sample_shape: tuple[int | None, ...], batch_size: int
                        ) -> DataSource:
    """Batches from ``path/<class>/<image>``; labels are the class folders in sorted order."""
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [(p, label) for label, name in enumerate(classes)
             for p in sorted((path / name).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"no images in class subfolders of {path}",
                        "lay the images out as FOLDER/<class>/<image>.png")
    if len(sample_shape) != 3 or sample_shape[0] not in (1, 3, None):
        raise InputShapeError(f"the model expects inputs of shape {_shape_text(sample_shape)}, "
                              "not images", "give the data as a .npz with x and y instead")
    channels = sample_shape[0] or 3

    def read(image_path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(image_path) as image:  # reads the header only
                width, height = image.size
                if any(want is not None and have != want for have, want
                       in zip((height, width), sample_shape[1:], strict=True)):
                    raise InputShapeError(  # before decoding: a small file can hold a huge image
                        f"image {image_path} is {width}x{height} pixels, but the model expects "
                        f"{sample_shape[2]}x{sample_shape[1]} (inputs {_shape_text(sample_shape)})",
                        f"resize the images to {sample_shape[2]}x{sample_shape[1]} first "
                        "(specprof does not resize: it would change what the model sees)")
                pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"),
                                    dtype=np.float32)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
            raise DataError(f"cannot read image {image_path} ({error})",
                            "remove it or replace it with a valid PNG/JPEG") from error
        pixels = pixels / 255.0
        return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            x = np.stack([read(p) for p, _ in chunk])
            yield check_batch(x, np.array([label for _, label in chunk]), sample_shape, str(path))

    return DataSource(_Reiterable(batches), len(files), str(path), tuple(classes))


# --- Python objects -----------------------------------------------------------------------------


def _rebatch(pairs: Iterable[Any], sample_shape: tuple[int | None, ...], batch_size: int
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Group samples (or pass batches through, split to ``batch_size``) from an iterable."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    pending = 0
    for item in pairs:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise DataError("each item of the data must be an (x, y) pair; labels missing?",
                            "give pairs (input, label) or (inputs, labels)")
        x, y = check_batch(item[0], item[1], sample_shape, "the data")
        for start in range(0, len(x), batch_size):
            xs.append(x[start:start + batch_size])
            ys.append(y[start:start + batch_size])
            pending += len(xs[-1])
            if pending >= batch_size:
                x_all, y_all = np.concatenate(xs), np.concatenate(ys)
                yield x_all[:batch_size], y_all[:batch_size]
                rest = len(x_all) - batch_size
                xs, ys = ([x_all[batch_size:]], [y_all[batch_size:]]) if rest else ([], [])
                pending = rest
    if pending:
        yield np.concatenate(xs), np.concatenate(ys)


def open_data(data: Any, sample_shape: tuple[int | None, ...], batch_size: int = 64) -> DataSource:
    """A ``DataSource`` for ``data``: a path (.npz or image folder), arrays ``(x, y)``, or an
    iterable of ``(x, y)`` pairs. ``sample_shape`` is the model's input without the batch axis."""
    if batch_size < 1:
        raise DataError(f"batch size must be positive, not {batch_size}", "use e.g. 64")
    if isinstance(data, str | Path):
        path = Path(data)
        if not path.exists():
            raise DataError(f"data {path} does not exist", "check the path")
        if path.is_dir():
            return image_folder_source(path, sample_shape, batch_size)
        if path.suffix.lower() == ".npz":
            return npz_source(path, sample_shape, batch_size)
        raise DataError(f"cannot read data from {path} (not a .npz file nor a folder)",
                        "give a .npz with x and y, or a folder of images in class subfolders")
    if isinstance(data, np.ndarray):
        raise DataError("labels missing: the data is one array of inputs",
                        "pass (x, y): the inputs and one integer label per input")
    if (isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], np.ndarray)
            and np.ndim(data[0]) == len(sample_shape) + 1):
        x, y = check_batch(data[0], data[1], sample_shape, "the data")
        return DataSource([(x[s:s + batch_size], y[s:s + batch_size])
                           for s in range(0, len(x), batch_size)], len(x), "arrays")
    if isinstance(data, Iterable):
        size = len(data) if isinstance(data, Sized) else None
        return DataSource(_Reiterable(lambda: _rebatch(data, sample_shape, batch_size)), None,
                          f"<{type(data).__name__}>" + ("" if size is None else f" of {size}"))
    raise DataError(f"cannot read labelled inputs from a {type(data).__name__}",
                    "give a .npz path, an image folder, (x, y) arrays, or (x, y) pairs")
