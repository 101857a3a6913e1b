"""Rows to and from the engine's types: layers, spectra (arrays as little-endian bytes), query
records, and the parameter hash that finds a stored spectrum again."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from specprof.engine.db_models import LayerRow, SpectrumRow
from specprof.engine.jsonable import jsonable
from specprof.engine.store.filters import QUERY_COLUMNS
from specprof.engine.types import Layer, Request, Spectrum

if TYPE_CHECKING:
    import pandas as pd

VALUES_DTYPE = "<f8"
MULTIPLICITIES_DTYPE = "<i8"
FLOAT_COLUMNS = ("sigma_max", "sigma_min", "frobenius", "stable_rank", "upper_bound",
                 "lower_bound", "seconds")


def encode_array(array: np.ndarray, dtype: str) -> bytes:
    """C-order bytes of ``array`` in ``dtype`` (always little-endian, e.g. ``<f8``)."""
    return np.ascontiguousarray(array, dtype=np.dtype(dtype)).tobytes()


def decode_array(blob: bytes, dtype: str, shape: Sequence[int] | None = None) -> np.ndarray:
    """Inverse of ``encode_array``: a new native-endian array."""
    array = np.frombuffer(blob, dtype=np.dtype(dtype)).astype(np.dtype(dtype).newbyteorder("="))
    return array if shape is None else array.reshape(tuple(shape))


def params_hash(params: Mapping[str, Any], keys: Sequence[str] | None = None) -> str:
    """sha256 of the canonical JSON of ``params`` (only ``keys`` of it, when given).

    A spectrum's dedupe identity hashes ``spectrum_identity(params)``; an analysis hashes all
    of its parameters.
    """
    if keys is not None:
        params = {key: params[key] for key in keys if key in params}
    return hashlib.sha256(json.dumps(jsonable(params), sort_keys=True).encode()).hexdigest()


def spectrum_identity(params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters that change a spectrum (``Request.IDENTITY``); a backend's own extras,
    such as its ``method``, are on record in ``params`` but not part of the identity."""
    return {key: params[key] for key in Request.IDENTITY if key in params}


def spectrum_params_hash(params: Mapping[str, Any]) -> str:
    """The dedupe key of a spectrum with ``params``: the hash of its identity keys only."""
    return params_hash(spectrum_identity(params))


def finite(value: float | None) -> float | None:
    """NaN as NULL: SQLite cannot store NaN, and NULL says 'unknown' on every backend."""
    return None if value is None or math.isnan(value) else float(value)


def shape_text(shape: Sequence[int] | None) -> str | None:
    """``[16, 3, 3, 3]`` as ``"16x3x3x3"``."""
    return None if shape is None else "x".join(str(size) for size in shape)


def layer_row(model_id: int, position: int, layer: Layer) -> LayerRow:
    """The row of ``layer``, the ``position``-th layer of model ``model_id``."""
    def listed(shape: Sequence[int] | None) -> list[int] | None:
        return None if shape is None else [int(size) for size in shape]

    return LayerRow(
        model_id=model_id, index=position, name=layer.name, op_type=layer.op_type,
        weight_shape=listed(layer.weight.shape), input_shape=listed(layer.input_shape),
        output_shape=listed(layer.output_shape), strides=listed(layer.strides),
        pads=listed(layer.pads), dilations=listed(layer.dilations),
        output_padding=listed(layer.output_padding), groups=int(layer.groups),
        weight_hash=layer.weight_hash, layer_hash=layer.content_hash,
        description=layer.describe()[:255], block=layer.block, role=layer.role or None,
    )


def vectors_dtype(vectors: np.ndarray) -> str:
    """float32 vectors stay float32 (half the bytes); everything else is stored as float64."""
    return "<f4" if vectors.dtype == np.float32 else "<f8"


def spectrum_columns(spectrum: Spectrum) -> dict[str, Any]:
    """The spectra-table columns of a computed spectrum (everything but ids and status).

    A partial spectrum (``complete`` False: only the largest values) has no known smallest
    value or stable rank: those are stored as NULL whatever the spectrum computed.
    """
    vectors, mult = spectrum.left_vectors, spectrum.multiplicities
    left_dtype = None if vectors is None else vectors_dtype(vectors)
    complete = bool(spectrum.complete)
    return {
        "backend": spectrum.backend, "kind": spectrum.kind, "boundary": spectrum.boundary,
        "params": jsonable(spectrum.params), "params_hash": spectrum_params_hash(spectrum.params),
        "values": encode_array(spectrum.values, VALUES_DTYPE),
        "multiplicities": None if mult is None else encode_array(mult, MULTIPLICITIES_DTYPE),
        "left_vectors": None if vectors is None else encode_array(vectors, left_dtype or ""),
        "left_vectors_shape": None if vectors is None else list(vectors.shape),
        "left_vectors_dtype": left_dtype, "n_values": spectrum.n_values,
        "sigma_max": finite(spectrum.sigma_max),
        "sigma_min": finite(spectrum.sigma_min) if complete else None,
        "frobenius": finite(spectrum.frobenius),
        "stable_rank": finite(spectrum.stable_rank) if complete else None,
        "upper_bound": spectrum.upper_bound, "lower_bound": spectrum.lower_bound,
        "exact": spectrum.exact, "complete": complete, "seconds": spectrum.seconds,
        "device": spectrum.device,
    }


def row_spectrum(row: SpectrumRow) -> Spectrum:
    """The Spectrum stored in ``row`` (status ok), with its arrays decoded."""
    vectors = None
    if row.left_vectors is not None:
        vectors = decode_array(row.left_vectors, row.left_vectors_dtype or "<f8",
                               row.left_vectors_shape)
    return Spectrum(
        values=decode_array(row.values or b"", VALUES_DTYPE), kind=row.kind,  # type: ignore[arg-type]
        backend=row.backend, exact=bool(row.exact),
        multiplicities=None if row.multiplicities is None
        else decode_array(row.multiplicities, MULTIPLICITIES_DTYPE),
        boundary=row.boundary, left_vectors=vectors,  # type: ignore[arg-type]
        upper_bound=row.upper_bound, lower_bound=row.lower_bound, seconds=row.seconds or 0.0,
        device=row.device or "cpu", params=dict(row.params or {}), note=row.message or "",
        complete=row.complete is not False,
    )


def expanded_values(values: bytes | None, multiplicities: bytes | None) -> list[float] | None:
    """Stored values as a list, each repeated by its multiplicity; None without values."""
    if values is None:
        return None
    array = decode_array(values, VALUES_DTYPE)
    if multiplicities is not None:
        array = np.repeat(array, decode_array(multiplicities, MULTIPLICITIES_DTYPE))
    return [float(value) for value in array]


def query_record(row: Any, values: bool) -> dict[str, Any]:
    """One row of ``filters.query_statement`` as a record of ``Store.query``'s frame."""
    record = {name: row[name] for name in QUERY_COLUMNS if name in row}
    record["shape"] = shape_text(row["weight_shape"])
    record["input_shape"] = shape_text(row["input_shape"])
    if values:
        record["singular_values"] = expanded_values(row["values"], row["multiplicities"])
    return record


def query_frame(rows: Sequence[Any], values: bool) -> pd.DataFrame:
    """``Store.query``'s frame from rows of ``filters.query_statement``, with nullable dtypes
    (a skipped layer has no n_values; a partial spectrum no sigma_min)."""
    import pandas as pd  # lazily: opening a store for writes should not pay for pandas

    columns = [*QUERY_COLUMNS, "singular_values"] if values else list(QUERY_COLUMNS)
    frame = pd.DataFrame([query_record(row, values) for row in rows], columns=columns)
    return frame.astype({"n_values": "Int64", "block": "Int64", "exact": "boolean",
                         "complete": "boolean", "layer_index": "int64", "run": "int64", "spectrum_id": "int64",
                         **dict.fromkeys(FLOAT_COLUMNS, "float64")})


def analyses_frame(rows: Sequence[Any]) -> pd.DataFrame:
    """``Store.analyses``' frame from rows of ``filters.analyses_statement``: the fixed
    columns, then one column per metric key."""
    import pandas as pd

    base = ["analysis_id", "run", "model", "layer", "layer_index", "analyzer", "params",
            "created_at"]
    metric_keys = list(dict.fromkeys(key for row in rows for key in (row["metrics"] or {})))
    records = [{**{name: row[name] for name in base}, **(row["metrics"] or {})} for row in rows]
    frame = pd.DataFrame(records, columns=base + [k for k in metric_keys if k not in base])
    return frame.astype({"layer_index": "Int64"})
