"""Runs as JSON documents: ``specprof export`` writes one, ``specprof import`` reads it back.

A document follows ``schemas/run-export.schema.json``. Reading one is guarded (size, nesting
depth, UTF-8, JSON, schema, references, array sizes) and converted whole before anything is
written, so a bad file is refused with one line and leaves the database as it was.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import importlib.resources
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, DateTime, Integer, select

from specprof.engine.db_models import (
    AnalysisRow,
    Base,
    HypergraphRow,
    LayerRow,
    ModelRow,
    RunRow,
    SpectrumRow,
)
from specprof.engine.errors import StoreError

EXPORT_FORMAT = "specprof-run"
EXPORT_VERSION = 2
"""2 added ``results[].complete``; version 1 documents (without it) still import."""
EXPORT_VERSIONS = (1, 2)
EXPORT_SCHEMA = "run-export.schema.json"

MAX_EXPORT_BYTES = 2 * 1024**3
"""The largest file ``read_export`` reads (2 GiB): far above any real run, below a memory blow-up."""
MAX_EXPORT_DEPTH = 64
"""The deepest nesting of objects and arrays a document may have (real exports use under 10)."""

VERSIONED_PACKAGES = ("specprof", "numpy", "scipy", "onnx", "sqlalchemy")
BLOB_COLUMNS = ("values", "multiplicities", "left_vectors")
_NOT_TAKEN = ("id", "run_id", "model_id", "layer_id", "spectrum_id", "pid")
_INT64 = (-(2**63), 2**63 - 1)
_EXPORT_HINT = "export it again with: specprof export --run ID -o run.json"
_FILE_HINT = "pass a file written by: specprof export --run ID -o run.json"


def package_versions() -> dict[str, str | None]:
    """Package versions recorded with a run, so results can be traced to the code that made them."""
    found: dict[str, str | None] = {}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


# --- rows as JSON --------------------------------------------------------------------------------


def row_to_json(row: Any, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """A row as JSON data: blobs as base64, times as ISO 8601."""
    data: dict[str, Any] = {}
    for column in row.__table__.columns:
        if column.name in exclude:
            continue
        value = getattr(row, column.name)
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")
        elif isinstance(value, datetime):
            value = value.isoformat()
        data[column.name] = value
    return data


def json_to_fields(model: type[Base], data: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Inverse of ``row_to_json`` for the columns ``model`` has (ids are never taken over).

    A value the schema cannot check (a time that is not ISO 8601, base64 of the wrong length,
    an integer too large for the database) is a StoreError naming ``where`` it is.
    """
    fields: dict[str, Any] = {}
    for column in model.__table__.columns:
        name = column.name
        if name in _NOT_TAKEN or name not in data:
            continue
        value = data[name]
        try:
            if value is not None and name in BLOB_COLUMNS:
                value = base64.b64decode(value, validate=True)
            elif value is not None and isinstance(column.type, DateTime):
                value = datetime.fromisoformat(value)
            elif isinstance(value, int) and isinstance(column.type, Integer | BigInteger) \
                    and not _INT64[0] <= value <= _INT64[1]:
                raise ValueError(f"{value} does not fit a 64-bit integer")
        except (ValueError, TypeError, binascii.Error) as error:
            raise invalid_export(f"{where}/{name}".lstrip("/"), str(error)) from error
        fields[name] = value
    return fields


def invalid_export(where: str, reason: str) -> StoreError:
    """The one-line error for a document that is not a valid run export."""
    reason = reason if len(reason) <= 200 else reason[:200] + "..."
    return StoreError(f"not a valid specprof run export at {where or '(top level)'}: {reason}",
                      _EXPORT_HINT)


# --- reading and checking a document -------------------------------------------------------------


def read_export(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON document in the file ``path``, read with limits; a one-line StoreError for a
    file that is missing, larger than ``MAX_EXPORT_BYTES``, not UTF-8, not JSON, or nested
    deeper than ``MAX_EXPORT_DEPTH``. The content is checked further by ``validate_export``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_EXPORT_BYTES:
            raise _too_large(path)
        with path.open("rb") as file:
            data = file.read(MAX_EXPORT_BYTES + 1)  # a pipe or growing file has no honest size
    except OSError as error:
        raise StoreError(f"cannot read {path}: {error.strerror or error}", "check the path") \
            from error
    if len(data) > MAX_EXPORT_BYTES:
        raise _too_large(path)
    return parse_export(data, str(path))


def _too_large(path: Path) -> StoreError:
    return StoreError(f"{path} is larger than {MAX_EXPORT_BYTES:,} bytes, the most a run export "
                      "may be", "export fewer results per file, or check that this is an export")


def parse_export(data: bytes | str, source: str = "the document") -> dict[str, Any]:
    """``data`` (UTF-8 bytes or text) parsed as JSON, within ``MAX_EXPORT_DEPTH``; NaN and
    Infinity, which Python writes but JSON lacks, are read as null."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise StoreError(f"{source} is not UTF-8 text (byte {error.start}: {error.reason})",
                             _FILE_HINT) from error
    else:
        text = data
    try:
        document = json.loads(text, parse_constant=lambda _constant: None)
    except json.JSONDecodeError as error:
        raise StoreError(f"{source} is not JSON: {error}", _FILE_HINT) from error
    except RecursionError as error:
        raise _too_deep(source, "") from error
    if not isinstance(document, dict):
        raise invalid_export("(top level)", f"a JSON {type(document).__name__}, not an object")
    check_depth(document, source)
    return document


def check_depth(document: Any, source: str = "the document",
                limit: int = MAX_EXPORT_DEPTH) -> None:
    """Raise a StoreError when objects and arrays nest deeper than ``limit`` (iteratively, so
    no depth can overflow Python's stack here)."""
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(document, 1, ())]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, dict):
            children: Any = value.items()
        elif isinstance(value, list):
            children = enumerate(value)
        else:
            continue
        if depth > limit:
            raise _too_deep(source, "/".join(str(part) for part in path), limit)
        stack.extend((child, depth + 1, (*path, key)) for key, child in children
                     if isinstance(child, dict | list))


def _too_deep(source: str, where: str, limit: int = MAX_EXPORT_DEPTH) -> StoreError:
    place = f" at {where}" if where else ""
    return StoreError(f"{source} nests objects and arrays deeper than {limit} levels{place}",
                      _FILE_HINT)


def export_schema() -> dict[str, Any]:
    """The JSON Schema of a run export (``specprof.schemas/run-export.schema.json``)."""
    text = importlib.resources.files("specprof.schemas").joinpath(EXPORT_SCHEMA).read_text()
    return json.loads(text)


def validate_export(document: Any) -> None:
    """Raise a one-line StoreError unless ``document`` is a valid run export."""
    import jsonschema

    check_depth(document)
    try:
        jsonschema.validate(document, export_schema())
    except jsonschema.ValidationError as error:
        where = "/".join(str(part) for part in error.absolute_path)
        raise invalid_export(where, error.message) from error


def check_export_references(document: dict[str, Any]) -> None:
    """The layer and result positions an export refers to exist (the schema cannot say)."""
    layer_indexes = {layer["index"] for layer in document["layers"]}
    if len(layer_indexes) != len(document["layers"]):
        raise invalid_export("layers", "two layers have the same index")
    n_results = len(document["results"])
    seen: set[str] = set()
    for position, item in enumerate(document["results"]):
        # One result per layer, backend and parameters in a run: a second one is a damaged or
        # forged document (every query would show the layer twice).
        key = json.dumps([item.get("layer_index"), item.get("backend"), item.get("params_hash")])
        if key in seen:
            raise invalid_export(f"results/{position}", f"a second result of layer "
                                 f"{item.get('layer_index')} by backend {item.get('backend')!r}")
        seen.add(key)
    for section in ("results", "analyses"):
        for position, item in enumerate(document[section]):
            layer_index, result_index = item.get("layer_index"), item.get("result_index")
            if layer_index is not None and layer_index not in layer_indexes:
                raise invalid_export(f"{section}/{position}", f"no layer with index {layer_index}")
            if result_index is not None and not 0 <= result_index < n_results:
                raise invalid_export(f"{section}/{position}", f"no result {result_index}")


def _check_arrays(fields: dict[str, Any], where: str) -> None:
    """The decoded blobs of a result have whole numbers of items, and agree in size."""
    values, mult, vectors = (fields.get(name) for name in BLOB_COLUMNS)
    if values is not None and len(values) % 8:
        raise invalid_export(f"{where}/values", "not a whole number of float64 values")
    if mult is not None and (values is None or len(mult) != len(values)):
        raise invalid_export(f"{where}/multiplicities", "not one int64 per value")
    if vectors is not None:
        shape = fields.get("left_vectors_shape") or []
        itemsize = 4 if fields.get("left_vectors_dtype") == "<f4" else 8
        if len(vectors) != math.prod(shape) * itemsize:
            raise invalid_export(f"{where}/left_vectors", f"not {shape} values of "
                                 f"{fields.get('left_vectors_dtype') or '<f8'}")


# --- export ------------------------------------------------------------------------------------


def export_document(model: ModelRow, layers: Sequence[LayerRow], run: RunRow,
                    results: Sequence[SpectrumRow], analyses: Sequence[AnalysisRow],
                    hypergraphs: Sequence[HypergraphRow]) -> dict[str, Any]:
    """The export document of one run from its rows (layers by index, the rest by id)."""
    index_of = {layer.id: layer.index for layer in layers}
    position = {row.id: n for n, row in enumerate(results)}
    return {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
        "model": row_to_json(model, exclude=("id",)),
        "layers": [row_to_json(layer, exclude=("id", "model_id")) for layer in layers],
        "run": row_to_json(run, exclude=("id", "model_id", "pid")),
        "results": [{**row_to_json(row, exclude=("id", "run_id", "layer_id")),
                     "layer_index": index_of[row.layer_id]} for row in results],
        "analyses": [{**row_to_json(row, exclude=("id", "run_id", "layer_id", "spectrum_id")),
                      "layer_index": index_of.get(row.layer_id or -1),
                      "result_index": position.get(row.spectrum_id or -1)}
                     for row in analyses],
        "hypergraphs": [row_to_json(row, exclude=("id", "run_id")) for row in hypergraphs],
    }


# --- import ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportPlan:
    """A checked export document as column values, ready to write in one transaction."""

    model: dict[str, Any]
    layers: list[dict[str, Any]]
    run: dict[str, Any]
    results: list[tuple[int, dict[str, Any]]]  # (layer index, columns)
    analyses: list[tuple[int | None, int | None, dict[str, Any]]]  # (layer, result, columns)
    hypergraphs: list[dict[str, Any]]


def plan_import(document: Any) -> ImportPlan:
    """Check ``document`` whole (schema, references, values) and convert it; nothing is
    written, so a document refused here leaves the database untouched."""
    validate_export(document)
    check_export_references(document)
    run = json_to_fields(RunRow, document["run"], "run")
    if run["status"] == "running":  # nobody is writing to the imported copy
        run["status"] = "interrupted"
    results = []
    for position, item in enumerate(document["results"]):
        where = f"results/{position}"
        fields = json_to_fields(SpectrumRow, item, where)
        _check_arrays(fields, where)
        if fields.get("complete") is False:  # unknown for a partial spectrum, whatever it says
            fields["sigma_min"] = fields["stable_rank"] = None
        results.append((item["layer_index"], fields))
    return ImportPlan(
        model=json_to_fields(ModelRow, document["model"], "model"),
        layers=[json_to_fields(LayerRow, layer, f"layers/{n}")
                for n, layer in enumerate(document["layers"])],
        run=run, results=results,
        analyses=[(item.get("layer_index"), item.get("result_index"),
                   json_to_fields(AnalysisRow, item, f"analyses/{n}"))
                  for n, item in enumerate(document["analyses"])],
        hypergraphs=[{"edge_properties": {}, "node_properties": {},
                      **json_to_fields(HypergraphRow, item, f"hypergraphs/{n}")}
                     for n, item in enumerate(document["hypergraphs"])],
    )


def write_import(session: Any, plan: ImportPlan, display_url: str) -> int:
    """Write ``plan`` as a new run in the caller's transaction; the new run's id."""
    model_id = _import_model(session, plan, display_url)
    layer_ids: dict[int, int] = dict(session.execute(select(LayerRow.index, LayerRow.id)
                                     .where(LayerRow.model_id == model_id)).all())
    run = RunRow(model_id=model_id, **plan.run)
    session.add(run)
    session.flush()
    results = [SpectrumRow(run_id=run.id, layer_id=layer_ids[layer_index], **fields)
               for layer_index, fields in plan.results]
    session.add_all(results)
    session.flush()
    for layer_index, result_index, fields in plan.analyses:
        session.add(AnalysisRow(
            run_id=run.id, **fields,
            layer_id=None if layer_index is None else layer_ids[layer_index],
            spectrum_id=None if result_index is None else results[result_index].id))
    session.add_all(HypergraphRow(run_id=run.id, **fields) for fields in plan.hypergraphs)
    session.flush()
    return int(run.id)


def _import_model(session: Any, plan: ImportPlan, display_url: str) -> int:
    """The model of the plan: the stored one with the same hash (its layers must agree), or
    a new one with the plan's layers."""
    existing = session.scalar(select(ModelRow).where(ModelRow.sha256 == plan.model["sha256"]))
    if existing is None:
        model = ModelRow(**plan.model)
        session.add(model)
        session.flush()
        session.add_all(LayerRow(model_id=model.id, **layer) for layer in plan.layers)
        session.flush()
        return int(model.id)
    stored = dict(session.execute(select(LayerRow.index, LayerRow.layer_hash)
                                  .where(LayerRow.model_id == existing.id)).all())
    if stored != {layer["index"]: layer["layer_hash"] for layer in plan.layers}:
        raise StoreError(f"model {existing.name!r} in {display_url} has the same hash "
                         "but different layers than the imported run",
                         "import into another database, or delete that model first")
    return int(existing.id)
