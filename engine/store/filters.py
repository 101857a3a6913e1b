"""What a query may ask: ``--where`` and ``--sort`` parsed (never pasted into SQL), name globs,
id filters, and the SELECT statements behind the Store's reads."""

from __future__ import annotations

import operator
import re
from typing import Any

from sqlalchemy import ColumnElement, Select, case, exists, false, func, select

from specprof.engine.db_models import (
    AnalysisRow,
    HypergraphRow,
    LayerRow,
    ModelRow,
    RunRow,
    SpectrumRow,
)
from specprof.engine.errors import StoreError

# The columns ``--where`` and ``--sort`` may name: summary columns of a result, never free SQL.
WHERE_COLUMNS = ("sigma_max", "sigma_min", "frobenius", "stable_rank", "upper_bound",
                 "lower_bound", "n_values", "seconds")
NAME_COLUMNS = ("block", "role")
"""Layer columns read from names: ``block`` compares with numbers, ``role`` with a quoted word."""
RUN_PARAMETERS = ("step",)
"""Numbers a run records in its configuration (``step``: the training step of a
``specprof.training.SpectralMonitor`` run), filtered and sorted like columns."""
SORT_COLUMNS = (*WHERE_COLUMNS, "run", "model", "layer", "layer_index", "backend", "kind",
                "status", "spectrum_id", *NAME_COLUMNS, *RUN_PARAMETERS)

QUERY_COLUMNS = (
    "spectrum_id", "run", "model", "layer", "layer_index", "block", "role", "op_type", "shape",
    "input_shape", "backend", "kind", "boundary", "status", "message", "n_values", "sigma_max",
    "sigma_min", "frobenius", "stable_rank", "upper_bound", "lower_bound", "exact", "complete",
    "seconds", "device", *RUN_PARAMETERS,
)

MAX_ROW_ID = 2**63 - 1
"""Row ids are 64-bit signed integers; a larger number names no row (and no driver binds it)."""

_WHERE_TERM = re.compile(
    r"\s*([A-Za-z_]+)\s*(<=|>=|==|!=|<>|=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_WHERE_WORD = re.compile(r"\s*([A-Za-z_]+)\s*(==|!=|<>|=)\s*'([A-Za-z0-9_.-]*)'\s*$")
_STRING_COLUMNS = ("role",)
_WHERE_HINT = ("write COLUMN OP NUMBER (or role = 'WORD') joined by 'and', e.g. 'sigma_max > 3 "
               "and stable_rank < 10' or \"role = 'v' and block < 4\"")


def _where_term(part: str) -> tuple[str, str, float | str]:
    """One ``column op value`` term: a number, or a quoted word for ``role``."""
    match = _WHERE_TERM.match(part)
    word = _WHERE_WORD.match(part) if match is None else None
    if match is None and word is None:
        raise StoreError(f"cannot read the condition {part.strip()!r} in --where", _WHERE_HINT)
    found = match or word
    assert found is not None
    column, op = found.group(1).lower(), {"==": "=", "<>": "!="}.get(found.group(2), found.group(2))
    allowed = (*WHERE_COLUMNS, *NAME_COLUMNS, *RUN_PARAMETERS)
    if column not in allowed:
        raise StoreError(f"--where cannot filter on {column!r}", f"use one of: {', '.join(allowed)}")
    if (word is not None) != (column in _STRING_COLUMNS):
        kind = "a quoted word, e.g. role = 'v'" if column in _STRING_COLUMNS else "a number"
        raise StoreError(f"--where compares {column!r} with {kind}", _WHERE_HINT)
    value: float | str = word.group(3).lower() if word is not None else float(found.group(3))
    return column, op, value


def parse_where(text: str | None) -> list[tuple[str, str, float | str]]:
    """``"sigma_max > 3 and stable_rank <= 10"`` as [(column, operator, value), ...].

    Only ``column op number`` terms (and ``role = 'word'`` / ``role != 'word'``) joined by
    ``and`` are accepted, and only the summary columns in ``WHERE_COLUMNS`` and the name
    columns in ``NAME_COLUMNS``: the text is parsed, never pasted into SQL (values are bound
    parameters).
    """
    if text is None or not text.strip():
        return []
    return [_where_term(part) for part in re.split(r"\s+and\s+", text.strip(), flags=re.IGNORECASE)]


def run_parameter(name: str) -> Any:
    """A number from the run's configuration JSON as a SQL expression (NULL where absent):
    JSON_EXTRACT on SQLite, ->> on PostgreSQL, through SQLAlchemy's JSON type."""
    return RunRow.config[name].as_float()


def comparison(column: str, op: str, value: float | str) -> ColumnElement[bool]:
    """One parsed ``--where`` term as a SQL condition on the spectra or layers table."""
    field: Any
    if column in RUN_PARAMETERS:
        field = run_parameter(column)
    elif column in NAME_COLUMNS:
        field = getattr(LayerRow, column)
    else:
        field = getattr(SpectrumRow, column)
    return {"<": field < value, "<=": field <= value, ">": field > value,
            ">=": field >= value, "=": field == value, "!=": field != value}[op]


def sort_order(sort: str | None) -> list[Any]:
    """``--sort`` (``"-sigma_max"``: descending) as ORDER BY terms, NULLs last."""
    if not sort:
        return []
    name = sort.lstrip("-").strip().lower()
    if name not in SORT_COLUMNS:
        raise StoreError(f"cannot sort by {name!r}", f"use one of: {', '.join(SORT_COLUMNS)} "
                         "(prefix '-' for descending)")
    column = {"run": SpectrumRow.run_id, "model": ModelRow.name, "layer": LayerRow.name,
              "layer_index": LayerRow.index, "spectrum_id": SpectrumRow.id,
              "block": LayerRow.block, "role": LayerRow.role, "step": run_parameter("step")}.get(
                  name, getattr(SpectrumRow, name, None))
    assert column is not None  # the name was checked against SORT_COLUMNS above
    ordered = column.desc() if sort.strip().startswith("-") else column.asc()
    return [ordered.nulls_last()]


def glob_to_like(pattern: str) -> str:
    """An fnmatch-style glob (``*``, ``?``) as a SQL LIKE pattern with ``\\`` as the escape."""
    special = {"*": "%", "?": "_", "%": "\\%", "_": "\\_", "\\": "\\\\"}
    return "".join(special.get(char, char) for char in pattern)


def name_matches(column: Any, pattern: str) -> ColumnElement[bool]:
    """``column`` matches the case-insensitive glob ``pattern`` (an exact name matches itself)."""
    return column.ilike(glob_to_like(pattern), escape="\\")


def is_row_id(value: Any) -> bool:
    """Whether ``value`` is an integer that can be a row id (0 .. 2**63 - 1)."""
    try:
        number = operator.index(value)
    except TypeError:
        return False
    return 0 <= number <= MAX_ROW_ID


def id_equals(column: Any, value: Any) -> ColumnElement[bool]:
    """``column = value``, or a condition that is never true for a number no id can have."""
    return column == operator.index(value) if is_row_id(value) else false()


def query_statement(values: bool) -> Select[Any]:
    """Layer results joined with their run, layer and model; the blobs only with ``values``."""
    s = SpectrumRow
    columns = [
        s.id.label("spectrum_id"), s.run_id.label("run"), ModelRow.name.label("model"),
        LayerRow.name.label("layer"), LayerRow.index.label("layer_index"), LayerRow.block,
        LayerRow.role, LayerRow.op_type,
        LayerRow.weight_shape, LayerRow.input_shape, s.backend, s.kind, s.boundary, s.status,
        s.message, s.n_values, s.sigma_max, s.sigma_min, s.frobenius, s.stable_rank,
        s.upper_bound, s.lower_bound, s.exact, s.complete, s.seconds, s.device,
        *(run_parameter(name).label(name) for name in RUN_PARAMETERS),
    ]
    if values:
        columns += [s.values, s.multiplicities]
    return (select(*columns).join(RunRow, s.run_id == RunRow.id)
            .join(LayerRow, s.layer_id == LayerRow.id).join(ModelRow, LayerRow.model_id == ModelRow.id))


def query_filters(model: str | None, layer: str | None, backend: str | None, kind: str | None,
                  run: int | None) -> list[ColumnElement[bool]]:
    """The conditions of ``Store.query``'s name globs and exact filters."""
    filters: list[ColumnElement[bool]] = []
    if model is not None:
        filters.append(name_matches(ModelRow.name, model))
    if layer is not None:
        filters.append(name_matches(LayerRow.name, layer))
    if backend is not None:
        filters.append(SpectrumRow.backend == backend)
    if kind is not None:
        filters.append(SpectrumRow.kind == kind)
    if run is not None:
        filters.append(id_equals(SpectrumRow.run_id, run))
    return filters


def runs_statement() -> Select[Any]:
    """One row per run, newest first, with its model's name and result counts by status."""
    def count(status: str) -> ColumnElement[int]:
        return func.count(case((SpectrumRow.status == status, 1)))

    return (select(RunRow.id, ModelRow.name.label("model"), RunRow.status,
                   RunRow.started_at.label("started"), RunRow.finished_at.label("finished"),
                   count("ok").label("n_spectra"), count("skipped").label("n_skipped"),
                   count("failed").label("n_failed"), RunRow.error)
            .join(ModelRow, RunRow.model_id == ModelRow.id)
            .outerjoin(SpectrumRow, SpectrumRow.run_id == RunRow.id)
            .group_by(RunRow.id, ModelRow.id).order_by(RunRow.id.desc()))


def runs_matching(model: str | None = None, status: str | None = None,
                  model_id: int | None = None, backend: str | None = None,
                  kind: str | None = None) -> Select[Any]:
    """Run ids, newest first, of models matching the glob ``model`` (and with id
    ``model_id``), with ``status``, and with ok results of ``backend`` and ``kind``; each
    None: any."""
    stmt = select(RunRow.id).join(ModelRow, RunRow.model_id == ModelRow.id)
    if model is not None:
        stmt = stmt.where(name_matches(ModelRow.name, model))
    if model_id is not None:
        stmt = stmt.where(id_equals(RunRow.model_id, model_id))
    if status is not None:
        stmt = stmt.where(RunRow.status == status)
    if backend is not None or kind is not None:
        results = [SpectrumRow.run_id == RunRow.id, SpectrumRow.status == "ok"]
        if backend is not None:
            results.append(SpectrumRow.backend == backend)
        if kind is not None:
            results.append(SpectrumRow.kind == kind)
        stmt = stmt.where(exists().where(*results))
    return stmt.order_by(RunRow.id.desc())


def describe_runs(model: str | None, backend: str | None, kind: str | None,
                  status: str | None) -> str:
    """What ``runs_matching`` looks for, in words: ``"complete run of a model named 'net'
    with filter spectra from backend 'fft'"``."""
    text = f"{status} run" if status else "run"
    if model is not None:
        text += f" of a model named {model!r}"
    if backend is not None or kind is not None:
        text += f" with {kind or 'any'} spectra"
        if backend is not None:
            text += f" from backend {backend!r}"
    return text


def analyses_statement(run: int | None, analyzer: str | None, model: str | None) -> Select[Any]:
    """Analysis rows with their run, model and layer, newest run first then by layer."""
    a = AnalysisRow
    stmt = (select(a.id.label("analysis_id"), a.run_id.label("run"),
                   ModelRow.name.label("model"), LayerRow.name.label("layer"),
                   LayerRow.index.label("layer_index"), a.analyzer, a.params, a.created_at,
                   a.metrics)
            .join(RunRow, a.run_id == RunRow.id).join(ModelRow, RunRow.model_id == ModelRow.id)
            .outerjoin(LayerRow, a.layer_id == LayerRow.id))
    if run is not None:
        stmt = stmt.where(id_equals(a.run_id, run))
    if analyzer is not None:
        stmt = stmt.where(a.analyzer == analyzer)
    if model is not None:
        stmt = stmt.where(name_matches(ModelRow.name, model))
    return stmt.order_by(a.run_id.desc(), LayerRow.index, a.id)


def hypergraphs_statement(run: int | None, analyzer: str | None) -> Select[Any]:
    """Hypergraph rows without their (big) JSON, newest first."""
    h = HypergraphRow
    stmt = (select(h.id.label("hypergraph_id"), h.run_id.label("run"),
                   ModelRow.name.label("model"), h.analyzer, h.name, h.params, h.created_at)
            .join(RunRow, h.run_id == RunRow.id).join(ModelRow, RunRow.model_id == ModelRow.id))
    if run is not None:
        stmt = stmt.where(id_equals(h.run_id, run))
    if analyzer is not None:
        stmt = stmt.where(h.analyzer == analyzer)
    return stmt.order_by(h.id.desc())
