"""The results store: models, layers, runs and spectra in SQLite or PostgreSQL.

SQLite is the default (one file at a per-user path, nothing to start); any SQLAlchemy URL works,
PostgreSQL through psycopg 3. The schema is created and changed only by the Alembic migrations
in ``specprof.migrations``: a new, empty database is migrated on first use, an existing one with
an older schema is never upgraded silently (``specprof db upgrade`` does it).

Every write is one transaction, so a run killed at any point leaves only whole layer results.
Arrays are stored as little-endian bytes (see ``specprof.engine.db_models``).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.resources
import json
import math
import os
import re
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    URL,
    ColumnElement,
    Connection,
    DateTime,
    Engine,
    Select,
    case,
    create_engine,
    delete,
    event,
    func,
    inspect,
    make_url,
    select,
    text,
)
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from specprof.engine.db_models import (
    RESULT_STATUSES,
    RUN_STATUSES,
    AnalysisRow,
    Base,
    HypergraphRow,
    LayerRow,
    ModelRow,
    RunRow,
    SpectrumRow,
    utcnow,
)
from specprof.engine.errors import StoreError
from specprof.engine.types import Layer, LoadedModel, Spectrum

if TYPE_CHECKING:
    import pandas as pd

VERSION_TABLE = "specprof_alembic_version"
"""Alembic's version table; named for us so a shared database can hold other apps' histories."""

BUSY_TIMEOUT_S = 30
"""How long a SQLite writer waits for another process's write lock before giving up."""

PG_CONNECT_TIMEOUT_S = 10
# Any constant works: concurrent first openers of one PostgreSQL database take turns migrating.
_PG_MIGRATION_LOCK = 0x5EC7_0001

VALUES_DTYPE = "<f8"
MULTIPLICITIES_DTYPE = "<i8"
VERSIONED_PACKAGES = ("specprof", "numpy", "scipy", "onnx", "sqlalchemy")

EXPORT_FORMAT = "specprof-run"
EXPORT_VERSION = 1
EXPORT_SCHEMA = "run-export.schema.json"

# The columns ``--where`` and ``--sort`` may name: summary columns of a result, never free SQL.
WHERE_COLUMNS = ("sigma_max", "sigma_min", "frobenius", "stable_rank", "upper_bound",
                 "lower_bound", "n_values", "seconds")
SORT_COLUMNS = (*WHERE_COLUMNS, "run", "model", "layer", "layer_index", "backend", "kind",
                "status", "spectrum_id")

QUERY_COLUMNS = (
    "spectrum_id", "run", "model", "layer", "layer_index", "op_type", "shape", "input_shape",
    "backend", "kind", "boundary", "status", "message", "n_values", "sigma_max", "sigma_min",
    "frobenius", "stable_rank", "upper_bound", "lower_bound", "exact", "seconds", "device",
)


# --- locations and URLs ------------------------------------------------------------------------


def default_db_path() -> Path:
    """The per-user SQLite file: ``$XDG_DATA_HOME/specprof/specprof.db`` (~/.local/share)."""
    data_home = os.environ.get("XDG_DATA_HOME", "")
    # The XDG spec says to ignore a relative value.
    base = Path(data_home) if os.path.isabs(data_home) else Path.home() / ".local" / "share"
    return base / "specprof" / "specprof.db"


def resolve_url(db: str | None) -> str:
    """The SQLAlchemy URL for ``--db``: None -> $SPECPROF_DB or the default file; a plain path ->
    a SQLite file; ``postgresql://``/``postgres://`` -> psycopg 3; any other URL unchanged."""
    if db is None:
        db = os.environ.get("SPECPROF_DB") or str(default_db_path())
    if "://" not in db:
        return f"sqlite:///{Path(db).expanduser().absolute()}"
    for prefix in ("postgresql://", "postgres://"):
        if db.startswith(prefix):
            return "postgresql+psycopg://" + db[len(prefix):]
    return db


def migrations_dir() -> Path:
    """The Alembic script folder, found as package data so it works from a wheel too."""
    return Path(str(importlib.resources.files("specprof.migrations")))


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config built in code (no alembic.ini); migrations run on ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest schema revision this specprof knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "specprof.migrations has no revisions"
    return head


def _known_revisions() -> set[str]:
    script = ScriptDirectory.from_config(alembic_config())
    return {revision.revision for revision in script.walk_revisions()}


# --- encoding ----------------------------------------------------------------------------------


def encode_array(array: np.ndarray, dtype: str) -> bytes:
    """C-order bytes of ``array`` in ``dtype`` (always little-endian, e.g. ``<f8``)."""
    return np.ascontiguousarray(array, dtype=np.dtype(dtype)).tobytes()


def decode_array(blob: bytes, dtype: str, shape: Sequence[int] | None = None) -> np.ndarray:
    """Inverse of ``encode_array``: a new native-endian array."""
    array = np.frombuffer(blob, dtype=np.dtype(dtype)).astype(np.dtype(dtype).newbyteorder("="))
    return array if shape is None else array.reshape(tuple(shape))


def params_hash(params: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a result's parameters (part of its dedupe identity)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


def glob_to_like(pattern: str) -> str:
    """An fnmatch-style glob (``*``, ``?``) as a SQL LIKE pattern with ``\\`` as the escape."""
    special = {"*": "%", "?": "_", "%": "\\%", "_": "\\_", "\\": "\\\\"}
    return "".join(special.get(char, char) for char in pattern)


def _jsonable(value: Any) -> Any:
    """JSON columns need plain data; anything else (paths, numpy scalars) becomes a string."""
    return json.loads(json.dumps(value, default=str))


def json_clean(value: Any) -> Any:
    """Plain JSON data for a JSON column: numpy scalars and arrays as Python numbers and lists,
    NaN/Inf as null (PostgreSQL's JSON rejects them), anything else unknown as a string."""
    if isinstance(value, dict):
        return {str(key): json_clean(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | np.ndarray):
        return [json_clean(item) for item in (value.tolist() if isinstance(value, np.ndarray)
                                              else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie, killed but not yet reaped by
    its parent, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): signal 0 said it exists
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _finite(value: float | None) -> float | None:
    """NaN as NULL: SQLite cannot store NaN, and NULL says 'unknown' on every backend."""
    return None if value is None or math.isnan(value) else float(value)


def _shape_text(shape: Sequence[int] | None) -> str | None:
    return None if shape is None else "x".join(str(size) for size in shape)


# --- errors ------------------------------------------------------------------------------------


def _hint(reason: str, url: URL) -> str:
    low = reason.lower()
    if "password" in low or "authentication" in low:
        return "check the user name and password in the --db URL"
    if url.get_backend_name() == "sqlite":
        return "check that the file's folder exists and is writable, or pass --db with another path"
    if "refused" in low or "timeout" in low or "could not" in low or "resolve" in low:
        return "check that the server is running and the URL's host and port, or pass another --db URL"
    return "check the --db URL and that the database is reachable and writable"


def _store_error(action: str, url: URL, error: BaseException) -> StoreError:
    cause = getattr(error, "orig", None) or error
    lines = str(cause).strip().splitlines()
    reason = lines[0] if lines else type(cause).__name__
    if url.password:
        reason = reason.replace(str(url.password), "***")
    shown = url.render_as_string(hide_password=True)
    return StoreError(f"cannot {action} database {shown}: {reason}", _hint(reason, url))


@contextmanager
def _guarded(action: str, url: URL) -> Iterator[None]:
    """Database and file-system failures reach the user as one StoreError line."""
    try:
        yield
    except StoreError:
        raise
    except (SQLAlchemyError, OSError) as error:
        raise _store_error(action, url, error) from error


# --- engines -----------------------------------------------------------------------------------


def _parse_url(db: str | None) -> URL:
    text_url = resolve_url(db)
    try:
        return make_url(text_url)
    except ArgumentError as error:
        raise StoreError(f"not a database URL: {text_url!r}",
                         "pass a file path or a URL like postgresql://user@host/db") from error


def _is_sqlite_file(url: URL) -> bool:
    database = url.database or ""
    return url.get_backend_name() == "sqlite" and database not in ("", ":memory:") and \
        not database.startswith("file:")


def _configure_sqlite(engine: Engine) -> None:
    """WAL (readers never block the writer), a busy timeout, foreign keys, and explicit BEGIN.

    pysqlite's own transaction handling would commit around DDL and start write transactions
    lazily; we issue BEGIN ourselves so migrations are atomic and writers take the lock first
    (``BEGIN IMMEDIATE``), which the busy timeout can then wait for.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars, also inside dicts, lists and tuples, as Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(item) for item in value)
    return value


def _plain_parameters(_connection: Connection, _cursor: Any, statement: str, parameters: Any,
                      _context: Any, _executemany: bool) -> tuple[str, Any]:
    """numpy scalars in bound parameters as Python numbers. Ids often come from a query
    DataFrame as numpy integers, which the drivers do not take (sqlite3 would even bind an
    ``np.int64`` as an 8-byte blob and silently match nothing)."""
    return statement, _plain(parameters)


def _create_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})
        _configure_sqlite(engine)
    else:
        connect_args: dict[str, Any] = {}
        if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
        try:
            engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
        except (NoSuchModuleError, ModuleNotFoundError) as error:
            raise StoreError(f"no database driver for {url.drivername}: {error}",
                             "for PostgreSQL run: pip install 'specprof[postgres]'") from error
    event.listen(engine, "before_cursor_execute", _plain_parameters, retval=True)
    return engine


# --- schema state ------------------------------------------------------------------------------


def _current_revision(connection: Connection) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def _is_new(connection: Connection) -> bool:
    """A database without our version table and without any of our tables."""
    tables = set(inspect(connection).get_table_names())
    return not tables & ({VERSION_TABLE} | set(Base.metadata.tables))


def _take_migration_lock(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})


def _migrate(connection: Connection) -> None:
    command.upgrade(alembic_config(connection), "head")


def _check_revision(connection: Connection, shown_url: str) -> None:
    """Raise unless the schema is exactly this specprof's head revision."""
    revision, head = _current_revision(connection), head_revision()
    if revision == head:
        return
    if revision is not None and revision not in _known_revisions():
        raise StoreError(f"database was written by a newer specprof (schema {revision}, this "
                         f"specprof knows up to {head}): {shown_url}",
                         "run: pip install --upgrade specprof")
    raise StoreError(f"database schema is older ({revision or 'none'}) than this specprof ({head}): "
                     f"{shown_url}", f"run: specprof db upgrade --db {shown_url}")


# --- the store ---------------------------------------------------------------------------------


class Store:
    """A connection to one results database. Use ``Store.open``; close it (or use ``with``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._read = sessionmaker(engine, expire_on_commit=False)
        # On SQLite, write transactions take the write lock up front (see _configure_sqlite).
        self._write = sessionmaker(engine.execution_options(sqlite_begin="IMMEDIATE"),
                                   expire_on_commit=False)

    # lifecycle ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, db: str | None = None, *, check_schema: bool = True) -> Store:
        """Open (and, if new and empty, create) the database at ``db`` (see ``resolve_url``).

        With ``check_schema`` (the default) an existing database must be at this specprof's
        schema revision; ``check_schema=False`` is for ``upgrade()`` only.
        """
        url = _parse_url(db)
        with _guarded("open", url):
            if _is_sqlite_file(url):
                Path(url.database or "").parent.mkdir(parents=True, exist_ok=True)
            store = cls(_create_engine(url))
        try:
            store._prepare(check_schema)
            if check_schema:
                store.mark_stale_runs()
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def upgrade_url(cls, db: str | None = None) -> tuple[str | None, str]:
        """``specprof db upgrade``: bring the database at ``db`` to head; (before, after)."""
        with cls.open(db, check_schema=False) as store:
            return store.upgrade()

    def _prepare(self, check_schema: bool) -> None:
        with self._guarded("open"), self._write_connection() as connection:
            _take_migration_lock(connection)
            if _is_new(connection):
                _migrate(connection)
            elif check_schema:
                _check_revision(connection, self.display_url)

    def upgrade(self) -> tuple[str | None, str]:
        """Migrate the schema to head in one transaction; returns (revision before, after)."""
        with self._guarded("upgrade"), self._write_connection() as connection:
            _take_migration_lock(connection)
            before = _current_revision(connection)
            if before is not None and before not in _known_revisions():
                _check_revision(connection, self.display_url)
            _migrate(connection)
            return before, head_revision()

    def revision(self) -> str | None:
        """The schema revision the database is at (None: no schema)."""
        with self._guarded("read"), self.engine.connect() as connection:
            return _current_revision(connection)

    @property
    def display_url(self) -> str:
        """The database URL with its password masked, for messages."""
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _guarded(self, action: str) -> Any:
        return _guarded(action, self.engine.url)

    @contextmanager
    def _write_connection(self) -> Iterator[Connection]:
        with self.engine.execution_options(sqlite_begin="IMMEDIATE").begin() as connection:
            yield connection

    # writes ------------------------------------------------------------------------------------

    def add_model(self, model: LoadedModel) -> tuple[int, list[int]]:
        """Get or create ``model`` (by content hash) and its layers; (model id, layer ids)."""
        sha256 = model.content_hash
        with self._guarded("write to"):
            if self._model_id(sha256) is None:
                try:
                    self._insert_model(model, sha256)
                except IntegrityError:
                    # Another process stored the same model first: use theirs. Any other
                    # integrity problem leaves no model behind and is raised.
                    if self._model_id(sha256) is None:
                        raise
            return self._model_and_layer_ids(sha256)

    def _model_id(self, sha256: str) -> int | None:
        with self._read() as session:
            return session.scalar(select(ModelRow.id).where(ModelRow.sha256 == sha256))

    def _insert_model(self, model: LoadedModel, sha256: str) -> None:
        with self._write.begin() as session:
            row = ModelRow(sha256=sha256, name=model.name, format=model.format,
                           framework=model.framework, opset=model.opset, n_params=model.n_params)
            session.add(row)
            session.flush()
            session.add_all(_layer_row(row.id, position, layer)
                            for position, layer in enumerate(model.layers))

    def _model_and_layer_ids(self, sha256: str) -> tuple[int, list[int]]:
        with self._read() as session:
            model_id = session.scalar(select(ModelRow.id).where(ModelRow.sha256 == sha256))
            assert model_id is not None, "model vanished between insert and read"
            layer_ids = session.scalars(select(LayerRow.id).where(LayerRow.model_id == model_id)
                                        .order_by(LayerRow.index)).all()
            return model_id, list(layer_ids)

    def start_run(self, model_id: int, config: dict[str, Any]) -> int:
        """Record a new run of ``model_id`` with status running; returns its id."""
        row = RunRow(model_id=model_id, status="running", config=_jsonable(config),
                     versions=_versions(), host=socket.gethostname(), pid=os.getpid())
        with self._guarded("write to"), self._write.begin() as session:
            session.add(row)
            session.flush()
            return row.id

    def finish_run(self, run_id: int, status: str, error: str | None = None) -> None:
        """Mark a run complete, failed or interrupted (with the error, if any)."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {RUN_STATUSES}, not {status!r}")
        with self._guarded("write to"), self._write.begin() as session:
            row = session.get(RunRow, run_id)
            if row is None:
                raise StoreError(f"no run {run_id} in {self.display_url}", "see: specprof runs")
            row.status, row.error, row.finished_at = status, error, utcnow()

    def add_spectrum(self, run_id: int, layer_id: int, spectrum: Spectrum) -> int:
        """Store one computed spectrum, in one transaction; returns its id."""
        row = SpectrumRow(run_id=run_id, layer_id=layer_id, status="ok",
                          message=spectrum.note or None, **_spectrum_columns(spectrum))
        return self._add_result(row)

    def add_layer_result(self, run_id: int, layer_id: int, backend: str, kind: str | None,
                         status: str, message: str) -> int:
        """Store that a layer was skipped or failed, and why; returns the row id."""
        if status not in RESULT_STATUSES or status == "ok":
            raise ValueError(f"status must be 'skipped' or 'failed', not {status!r}")
        row = SpectrumRow(run_id=run_id, layer_id=layer_id, backend=backend, kind=kind,
                          status=status, message=message, params={}, params_hash=params_hash({}))
        return self._add_result(row)

    def _add_result(self, row: SpectrumRow) -> int:
        with self._guarded("write to"), self._write.begin() as session:
            layer = session.get(LayerRow, row.layer_id)
            if layer is None:
                raise StoreError(f"no layer {row.layer_id} in {self.display_url}",
                                 "store the model with add_model first")
            row.layer_hash = layer.layer_hash
            session.add(row)
            session.flush()
            return row.id

    # reads -------------------------------------------------------------------------------------

    def find_spectrum(self, layer_hash: str, backend: str, params: dict[str, Any]) -> Spectrum | None:
        """The newest stored ok spectrum of this layer content, backend and parameters."""
        stmt = (select(SpectrumRow)
                .where(SpectrumRow.layer_hash == layer_hash, SpectrumRow.backend == backend,
                       SpectrumRow.params_hash == params_hash(params), SpectrumRow.status == "ok")
                .order_by(SpectrumRow.id.desc()).limit(1))
        with self._guarded("read"), self._read() as session:
            row = session.scalar(stmt)
            return None if row is None else _row_spectrum(row)

    def load_spectrum(self, spectrum_id: int) -> Spectrum:
        """The stored spectrum ``spectrum_id`` with its values, multiplicities and vectors."""
        with self._guarded("read"), self._read() as session:
            row = session.get(SpectrumRow, spectrum_id)
        if row is None:
            raise StoreError(f"no spectrum {spectrum_id} in {self.display_url}",
                             "see: specprof query")
        if row.status != "ok" or row.values is None:
            raise StoreError(f"spectrum {spectrum_id} has no values (status {row.status}: "
                             f"{row.message})", "profile the layer with another backend")
        return _row_spectrum(row)

    def query(self, *, model: str | None = None, layer: str | None = None,
              backend: str | None = None, kind: str | None = None, run: int | None = None,
              values: bool = False, limit: int | None = None, where: str | None = None,
              sort: str | None = None) -> pd.DataFrame:
        """Stored layer results, newest run first, then by layer position.

        ``model`` and ``layer`` are case-insensitive globs (``*``, ``?``) on the names. With
        ``values`` a ``singular_values`` column holds every value, descending, each repeated by
        its multiplicity (None for skipped or failed layers). ``where`` filters on summary
        columns (``"sigma_max > 3 and stable_rank <= 10"``, see ``parse_where``); ``sort`` names
        a column to order by first, descending with a leading ``-`` (``"-sigma_max"``).
        """
        filters = _query_filters(model, layer, backend, kind, run)
        filters += [_comparison(column, op, number) for column, op, number in parse_where(where)]
        stmt = _query_statement(values).where(*filters)
        stmt = stmt.order_by(*_sort_order(sort), RunRow.id.desc(), LayerRow.index,
                             SpectrumRow.id).limit(limit)
        import pandas as pd  # lazily: opening a store for writes should not pay for pandas

        with self._guarded("read"), self.engine.connect() as connection:
            rows = connection.execute(stmt).mappings().all()
        columns = [*QUERY_COLUMNS, "singular_values"] if values else list(QUERY_COLUMNS)
        frame = pd.DataFrame([_query_record(row, values) for row in rows], columns=columns)
        floats = ("sigma_max", "sigma_min", "frobenius", "stable_rank", "upper_bound",
                  "lower_bound", "seconds")
        return frame.astype({"n_values": "Int64", "exact": "boolean", "layer_index": "int64",
                             "run": "int64", "spectrum_id": "int64",
                             **dict.fromkeys(floats, "float64")})

    def runs(self) -> pd.DataFrame:
        """One row per run, newest first: id, model, status, times and result counts."""
        def count(status: str) -> ColumnElement[int]:
            return func.count(case((SpectrumRow.status == status, 1)))

        stmt = (select(RunRow.id, ModelRow.name.label("model"), RunRow.status,
                       RunRow.started_at.label("started"), RunRow.finished_at.label("finished"),
                       count("ok").label("n_spectra"), count("skipped").label("n_skipped"),
                       count("failed").label("n_failed"), RunRow.error)
                .join(ModelRow, RunRow.model_id == ModelRow.id)
                .outerjoin(SpectrumRow, SpectrumRow.run_id == RunRow.id)
                .group_by(RunRow.id, ModelRow.id).order_by(RunRow.id.desc()))
        import pandas as pd

        with self._guarded("read"), self.engine.connect() as connection:
            rows = connection.execute(stmt).mappings().all()
        columns = ["id", "model", "status", "started", "finished", "n_spectra", "n_skipped",
                   "n_failed", "error"]
        return pd.DataFrame([dict(row) for row in rows], columns=columns)

    def latest_run(self, model: str | None = None, status: str | None = "complete") -> int | None:
        """The newest run id, of models matching the glob ``model`` and with ``status`` (None:
        any status); None when there is no such run."""
        stmt = select(RunRow.id).join(ModelRow, RunRow.model_id == ModelRow.id)
        if model is not None:
            stmt = stmt.where(ModelRow.name.ilike(glob_to_like(model), escape="\\"))
        if status is not None:
            stmt = stmt.where(RunRow.status == status)
        with self._guarded("read"), self._read() as session:
            return session.scalar(stmt.order_by(RunRow.id.desc()).limit(1))

    def run_info(self, run_id: int) -> dict[str, Any]:
        """Everything recorded about one run: model, status, config, versions, host, times."""
        with self._guarded("read"), self._read() as session:
            found = session.execute(select(RunRow, ModelRow.name)
                                    .join(ModelRow, RunRow.model_id == ModelRow.id)
                                    .where(RunRow.id == run_id)).first()
        if found is None:
            raise StoreError(f"no run {run_id} in {self.display_url}", "see: specprof runs")
        row, model_name = found
        return {"id": row.id, "model": model_name, "model_id": row.model_id, "status": row.status,
                "config": dict(row.config or {}), "versions": dict(row.versions or {}),
                "host": row.host, "pid": row.pid, "started_at": row.started_at,
                "finished_at": row.finished_at, "error": row.error}

    def layers(self, model_id: int) -> pd.DataFrame:
        """The stored layer rows of one model, by position (one column per ``layers`` column)."""
        import pandas as pd

        columns = [column.name for column in LayerRow.__table__.columns]
        stmt = select(LayerRow.__table__).where(LayerRow.model_id == model_id).order_by(LayerRow.index)
        with self._guarded("read"), self.engine.connect() as connection:
            rows = connection.execute(stmt).mappings().all()
        return pd.DataFrame([dict(row) for row in rows], columns=columns)

    def spectra_for_run(self, run_id: int, *, backend: str | None = None,
                        kind: str | None = None) -> list[tuple[dict[str, Any], Spectrum]]:
        """The ok spectra of a run by layer position: (layer row as a dict, plus its
        ``spectrum_id``; the decoded Spectrum). What analyzers read."""
        stmt = (select(SpectrumRow, LayerRow).join(LayerRow, SpectrumRow.layer_id == LayerRow.id)
                .where(SpectrumRow.run_id == run_id, SpectrumRow.status == "ok"))
        if backend is not None:
            stmt = stmt.where(SpectrumRow.backend == backend)
        if kind is not None:
            stmt = stmt.where(SpectrumRow.kind == kind)
        columns = [column.name for column in LayerRow.__table__.columns]
        with self._guarded("read"), self._read() as session:
            found = session.execute(stmt.order_by(LayerRow.index, SpectrumRow.id)).all()
            return [({**{name: getattr(layer, name) for name in columns},
                      "spectrum_id": spectrum.id}, _row_spectrum(spectrum))
                    for spectrum, layer in found]

    # analyses and hypergraphs ------------------------------------------------------------------

    def add_analysis(self, run_id: int, analyzer: str, params: dict[str, Any],
                     rows: list[dict[str, Any]]) -> list[int]:
        """Store an analyzer's metrics for a run in one transaction; returns the new row ids.

        Each row is ``{"layer_id": int | None, "spectrum_id": int | None, "metrics": dict}``.
        Rows stored earlier for the same run, analyzer and parameters are replaced in the same
        transaction, so re-running an analysis never leaves two answers or none.
        """
        digest = params_hash(params)
        with self._guarded("write to"), self._write.begin() as session:
            if session.get(RunRow, run_id) is None:
                raise StoreError(f"no run {run_id} in {self.display_url}", "see: specprof runs")
            session.execute(delete(AnalysisRow).where(AnalysisRow.run_id == run_id,
                                                      AnalysisRow.analyzer == analyzer,
                                                      AnalysisRow.params_hash == digest))
            new = [AnalysisRow(run_id=run_id, layer_id=row.get("layer_id"),
                               spectrum_id=row.get("spectrum_id"), analyzer=analyzer,
                               params=json_clean(params), params_hash=digest,
                               metrics=json_clean(row.get("metrics", {}))) for row in rows]
            session.add_all(new)
            session.flush()
            return [row.id for row in new]

    def analyses(self, *, run: int | None = None, analyzer: str | None = None,
                 model: str | None = None) -> pd.DataFrame:
        """Stored analysis metrics, newest run first then by layer position: columns
        analysis_id, run, model, layer, layer_index, analyzer, params, created_at, then one
        column per metric key (``model`` is a glob)."""
        a = AnalysisRow
        stmt = (select(a.id.label("analysis_id"), a.run_id.label("run"),
                       ModelRow.name.label("model"), LayerRow.name.label("layer"),
                       LayerRow.index.label("layer_index"), a.analyzer, a.params, a.created_at,
                       a.metrics)
                .join(RunRow, a.run_id == RunRow.id).join(ModelRow, RunRow.model_id == ModelRow.id)
                .outerjoin(LayerRow, a.layer_id == LayerRow.id))
        if run is not None:
            stmt = stmt.where(a.run_id == run)
        if analyzer is not None:
            stmt = stmt.where(a.analyzer == analyzer)
        if model is not None:
            stmt = stmt.where(ModelRow.name.ilike(glob_to_like(model), escape="\\"))
        stmt = stmt.order_by(a.run_id.desc(), LayerRow.index, a.id)
        import pandas as pd

        with self._guarded("read"), self.engine.connect() as connection:
            rows = connection.execute(stmt).mappings().all()
        base = ["analysis_id", "run", "model", "layer", "layer_index", "analyzer", "params",
                "created_at"]
        metric_keys = list(dict.fromkeys(key for row in rows for key in (row["metrics"] or {})))
        records = [{**{name: row[name] for name in base}, **(row["metrics"] or {})} for row in rows]
        frame = pd.DataFrame(records, columns=base + [k for k in metric_keys if k not in base])
        return frame.astype({"layer_index": "Int64"})

    def add_hypergraph(self, run_id: int, analyzer: str, name: str, params: dict[str, Any],
                       incidence: dict[str, list[str]], edge_properties: dict[str, Any] | None = None,
                       node_properties: dict[str, Any] | None = None) -> int:
        """Store one hypergraph of a run (``incidence``: {edge name: [node names]}); its id.

        An earlier hypergraph of the same run, analyzer, name and parameters is replaced in the
        same transaction, as ``add_analysis`` replaces its rows.
        """
        row = HypergraphRow(run_id=run_id, analyzer=analyzer, name=name, params=json_clean(params),
                            incidence=json_clean({str(edge): [str(node) for node in nodes]
                                                  for edge, nodes in incidence.items()}),
                            edge_properties=json_clean(edge_properties or {}),
                            node_properties=json_clean(node_properties or {}))
        with self._guarded("write to"), self._write.begin() as session:
            if session.get(RunRow, run_id) is None:
                raise StoreError(f"no run {run_id} in {self.display_url}", "see: specprof runs")
            earlier = session.scalars(select(HypergraphRow).where(
                HypergraphRow.run_id == run_id, HypergraphRow.analyzer == analyzer,
                HypergraphRow.name == name)).all()
            for old in earlier:  # JSON is not comparable in SQL on every database
                if old.params == row.params:
                    session.delete(old)
            session.add(row)
            session.flush()
            return row.id

    def hypergraphs(self, *, run: int | None = None, analyzer: str | None = None) -> pd.DataFrame:
        """Stored hypergraphs without their (big) JSON: hypergraph_id, run, model, analyzer,
        name, params, created_at; newest first."""
        h = HypergraphRow
        stmt = (select(h.id.label("hypergraph_id"), h.run_id.label("run"),
                       ModelRow.name.label("model"), h.analyzer, h.name, h.params, h.created_at)
                .join(RunRow, h.run_id == RunRow.id).join(ModelRow, RunRow.model_id == ModelRow.id))
        if run is not None:
            stmt = stmt.where(h.run_id == run)
        if analyzer is not None:
            stmt = stmt.where(h.analyzer == analyzer)
        import pandas as pd

        with self._guarded("read"), self.engine.connect() as connection:
            rows = connection.execute(stmt.order_by(h.id.desc())).mappings().all()
        columns = ["hypergraph_id", "run", "model", "analyzer", "name", "params", "created_at"]
        return pd.DataFrame([dict(row) for row in rows], columns=columns)

    def load_hypergraph(self, hypergraph_id: int) -> dict[str, Any]:
        """Every field of one stored hypergraph."""
        with self._guarded("read"), self._read() as session:
            row = session.get(HypergraphRow, hypergraph_id)
        if row is None:
            raise StoreError(f"no hypergraph {hypergraph_id} in {self.display_url}",
                             "list them with Store.hypergraphs()")
        return {"id": row.id, "run_id": row.run_id, "analyzer": row.analyzer, "name": row.name,
                "params": row.params, "incidence": row.incidence,
                "edge_properties": row.edge_properties, "node_properties": row.node_properties,
                "created_at": row.created_at}

    # interrupted runs --------------------------------------------------------------------------

    def mark_stale_runs(self) -> list[int]:
        """Mark 'running' runs whose writer process on this host is gone as interrupted.

        A run killed with ``kill -9`` (or by a crash of the machine's power) cannot close
        itself; its host and pid say whether it still can. Runs of other hosts are left alone
        (we cannot see their processes). Returns the ids marked.
        """
        host = socket.gethostname()
        stmt = select(RunRow.id, RunRow.pid).where(RunRow.status == "running", RunRow.host == host,
                                                   RunRow.pid.is_not(None))
        with self._guarded("read"), self._read() as session:
            candidates = session.execute(stmt).all()
        dead = [run_id for run_id, pid in candidates if not _process_alive(pid)]
        if dead:
            with self._guarded("write to"), self._write.begin() as session:
                for row in session.scalars(select(RunRow).where(RunRow.id.in_(dead),
                                                                RunRow.status == "running")):
                    row.status, row.finished_at = "interrupted", utcnow()
                    row.error = f"process {row.pid} on {host} ended without closing the run"
        return dead

    def resumable_run(self, model_id: int, config: dict[str, Any],
                      ignore: Sequence[str] = ("force", "resume")) -> int | None:
        """The newest interrupted or failed run of ``model_id`` with the same configuration
        (apart from the ``ignore`` keys), which ``profile --resume`` continues; else None."""
        wanted = {k: v for k, v in json_clean(config).items() if k not in ignore}
        stmt = (select(RunRow.id, RunRow.config)
                .where(RunRow.model_id == model_id, RunRow.status.in_(("interrupted", "failed")))
                .order_by(RunRow.id.desc()))
        with self._guarded("read"), self._read() as session:
            for run_id, stored in session.execute(stmt):
                if {k: v for k, v in (stored or {}).items() if k not in ignore} == wanted:
                    return int(run_id)
        return None

    def reopen_run(self, run_id: int) -> None:
        """Set an interrupted or failed run running again, owned by this process."""
        with self._guarded("write to"), self._write.begin() as session:
            row = session.get(RunRow, run_id)
            if row is None:
                raise StoreError(f"no run {run_id} in {self.display_url}", "see: specprof runs")
            row.status, row.error, row.finished_at = "running", None, None
            row.host, row.pid = socket.gethostname(), os.getpid()

    def run_results(self, run_id: int) -> dict[tuple[int, str], tuple[str, int]]:
        """What a run already stored: (layer id, backend) -> (status, result row id)."""
        stmt = select(SpectrumRow.layer_id, SpectrumRow.backend, SpectrumRow.status,
                      SpectrumRow.id).where(SpectrumRow.run_id == run_id)
        with self._guarded("read"), self._read() as session:
            return {(layer_id, backend): (status, row_id)
                    for layer_id, backend, status, row_id in session.execute(stmt)}

    # lifecycle: delete, export, import -------------------------------------------------------

    def delete(self, *, run: int | None = None, model: str | None = None) -> dict[str, int]:
        """Delete one run, or every model named ``model`` (exact name) with its layers, runs and
        results, in one transaction; returns how many runs and results went."""
        if (run is None) == (model is None):
            raise StoreError("delete needs exactly one of a run id or a model name",
                             "pass --run ID or --model NAME")
        with self._guarded("delete from"), self._write.begin() as session:
            if run is not None:
                what, model_ids = f"run {run}", []
                run_ids = list(session.scalars(select(RunRow.id).where(RunRow.id == run)))
                found = bool(run_ids)
            else:
                what = f"model {model!r}"
                model_ids = list(session.scalars(select(ModelRow.id).where(ModelRow.name == model)))
                run_ids = list(session.scalars(select(RunRow.id)
                                               .where(RunRow.model_id.in_(model_ids))))
                found = bool(model_ids)
            if not found:
                raise StoreError(f"no {what} in {self.display_url}", "see: specprof runs")
            n_results = int(session.scalar(select(func.count()).select_from(SpectrumRow)
                                           .where(SpectrumRow.run_id.in_(run_ids))) or 0)
            # The foreign keys cascade to spectra, analyses and hypergraphs (and layers).
            if run is not None:
                session.execute(delete(RunRow).where(RunRow.id == run))
            else:
                session.execute(delete(ModelRow).where(ModelRow.id.in_(model_ids)))
            return {"runs": len(run_ids), "results": n_results}

    def export_run(self, run_id: int) -> dict[str, Any]:
        """A whole run (model, layers, results, analyses, hypergraphs) as one JSON document
        following ``schemas/run-export.schema.json``; arrays are base64 of their bytes."""
        with self._guarded("read"), self._read() as session:
            run = session.get(RunRow, run_id)
            if run is None:
                raise StoreError(f"no run {run_id} in {self.display_url}", "see: specprof runs")
            model = session.get(ModelRow, run.model_id)
            assert model is not None
            layers = list(session.scalars(select(LayerRow).where(LayerRow.model_id == model.id)
                                          .order_by(LayerRow.index)))
            index_of = {layer.id: layer.index for layer in layers}
            results = list(session.scalars(select(SpectrumRow).where(SpectrumRow.run_id == run_id)
                                           .order_by(SpectrumRow.id)))
            position = {row.id: n for n, row in enumerate(results)}
            analyses = list(session.scalars(select(AnalysisRow)
                                            .where(AnalysisRow.run_id == run_id)
                                            .order_by(AnalysisRow.id)))
            graphs = list(session.scalars(select(HypergraphRow)
                                          .where(HypergraphRow.run_id == run_id)
                                          .order_by(HypergraphRow.id)))
            return {
                "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
                "model": _columns(model, exclude=("id",)),
                "layers": [_columns(layer, exclude=("id", "model_id")) for layer in layers],
                "run": _columns(run, exclude=("id", "model_id", "pid")),
                "results": [{**_columns(row, exclude=("id", "run_id", "layer_id")),
                             "layer_index": index_of[row.layer_id]} for row in results],
                "analyses": [{**_columns(row, exclude=("id", "run_id", "layer_id", "spectrum_id")),
                              "layer_index": index_of.get(row.layer_id or -1),
                              "result_index": position.get(row.spectrum_id or -1)}
                             for row in analyses],
                "hypergraphs": [_columns(row, exclude=("id", "run_id")) for row in graphs],
            }

    def import_run(self, document: dict[str, Any]) -> int:
        """Store a document made by ``export_run`` as a new run, in one transaction; its id.

        The document is validated against the JSON Schema first. The model is matched by its
        content hash (created if absent; its layers must then agree hash for hash).
        """
        validate_export(document)
        _check_export_references(document)
        with self._guarded("write to"), self._write.begin() as session:
            model_id = self._import_model(session, document)
            layer_ids: dict[int, int] = dict(session.execute(select(LayerRow.index, LayerRow.id)
                                             .where(LayerRow.model_id == model_id)).all())
            run_fields = _from_json(RunRow, document["run"])
            if run_fields["status"] == "running":  # nobody is writing to the imported copy
                run_fields["status"] = "interrupted"
            run = RunRow(model_id=model_id, **run_fields)
            session.add(run)
            session.flush()
            results = []
            for item in document["results"]:
                fields = _from_json(SpectrumRow, item)
                results.append(SpectrumRow(run_id=run.id, layer_id=layer_ids[item["layer_index"]],
                                           **fields))
            session.add_all(results)
            session.flush()
            for item in document["analyses"]:
                layer_index, result_index = item.get("layer_index"), item.get("result_index")
                session.add(AnalysisRow(
                    run_id=run.id, **_from_json(AnalysisRow, item),
                    layer_id=None if layer_index is None else layer_ids[layer_index],
                    spectrum_id=None if result_index is None else results[result_index].id))
            for item in document["hypergraphs"]:
                session.add(HypergraphRow(run_id=run.id, **{
                    "edge_properties": {}, "node_properties": {},
                    **_from_json(HypergraphRow, item)}))
            session.flush()
            return run.id

    def _import_model(self, session: Any, document: dict[str, Any]) -> int:
        model_fields = _from_json(ModelRow, document["model"])
        existing = session.scalar(select(ModelRow).where(ModelRow.sha256 == model_fields["sha256"]))
        layers = document["layers"]
        if existing is None:
            model = ModelRow(**model_fields)
            session.add(model)
            session.flush()
            session.add_all(LayerRow(model_id=model.id, **_from_json(LayerRow, layer))
                            for layer in layers)
            session.flush()
            return int(model.id)
        stored = dict(session.execute(select(LayerRow.index, LayerRow.layer_hash)
                                      .where(LayerRow.model_id == existing.id)).all())
        if stored != {layer["index"]: layer["layer_hash"] for layer in layers}:
            raise StoreError(f"model {existing.name!r} in {self.display_url} has the same hash "
                             "but different layers than the imported run",
                             "import into another database, or delete that model first")
        return int(existing.id)

    def counts(self) -> dict[str, int]:
        """Rows per table (models, layers, runs, spectra)."""
        tables = {"models": ModelRow, "layers": LayerRow, "runs": RunRow, "spectra": SpectrumRow}
        with self._guarded("read"), self._read() as session:
            return {name: int(session.scalar(select(func.count()).select_from(table)) or 0)
                    for name, table in tables.items()}


# --- --where and --sort ------------------------------------------------------------------------

_WHERE_TERM = re.compile(
    r"\s*([A-Za-z_]+)\s*(<=|>=|==|!=|<>|=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def parse_where(text: str | None) -> list[tuple[str, str, float]]:
    """``"sigma_max > 3 and stable_rank <= 10"`` as [(column, operator, number), ...].

    Only ``column op number`` terms joined by ``and`` are accepted, and only the summary
    columns in ``WHERE_COLUMNS``: the text is parsed, never pasted into SQL.
    """
    if text is None or not text.strip():
        return []
    terms = []
    for part in re.split(r"\s+and\s+", text.strip(), flags=re.IGNORECASE):
        match = _WHERE_TERM.match(part)
        if match is None:
            raise StoreError(f"cannot read the condition {part.strip()!r} in --where",
                             "write COLUMN OP NUMBER joined by 'and', e.g. 'sigma_max > 3 and "
                             "stable_rank < 10'")
        column, op, number = match.group(1).lower(), match.group(2), float(match.group(3))
        if column not in WHERE_COLUMNS:
            raise StoreError(f"--where cannot filter on {column!r}",
                             f"use one of: {', '.join(WHERE_COLUMNS)}")
        terms.append((column, {"==": "=", "<>": "!="}.get(op, op), number))
    return terms


def _comparison(column: str, op: str, number: float) -> ColumnElement[bool]:
    field = getattr(SpectrumRow, column)
    return {"<": field < number, "<=": field <= number, ">": field > number,
            ">=": field >= number, "=": field == number, "!=": field != number}[op]


def _sort_order(sort: str | None) -> list[Any]:
    if not sort:
        return []
    name = sort.lstrip("-").strip().lower()
    if name not in SORT_COLUMNS:
        raise StoreError(f"cannot sort by {name!r}", f"use one of: {', '.join(SORT_COLUMNS)} "
                         "(prefix '-' for descending)")
    column = {"run": SpectrumRow.run_id, "model": ModelRow.name, "layer": LayerRow.name,
              "layer_index": LayerRow.index, "spectrum_id": SpectrumRow.id}.get(
                  name, getattr(SpectrumRow, name, None))
    assert column is not None  # the name was checked against SORT_COLUMNS above
    ordered = column.desc() if sort.strip().startswith("-") else column.asc()
    return [ordered.nulls_last()]


# --- export documents --------------------------------------------------------------------------

_BLOB_COLUMNS = ("values", "multiplicities", "left_vectors")


def _columns(row: Any, exclude: Sequence[str] = ()) -> dict[str, Any]:
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


def _from_json(model: type[Base], data: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``_columns`` for the columns ``model`` has (ids are never taken over)."""
    fields: dict[str, Any] = {}
    for column in model.__table__.columns:
        name = column.name
        if name in ("id", "run_id", "model_id", "layer_id", "spectrum_id", "pid") or name not in data:
            continue
        value = data[name]
        if value is not None and name in _BLOB_COLUMNS:
            value = base64.b64decode(value)
        elif value is not None and isinstance(column.type, DateTime):
            value = datetime.fromisoformat(value)
        fields[name] = value
    return fields


def _check_export_references(document: dict[str, Any]) -> None:
    """The layer and result positions an export refers to exist (the schema cannot say)."""
    layer_indexes = {layer["index"] for layer in document["layers"]}
    n_results = len(document["results"])
    for section in ("results", "analyses"):
        for position, item in enumerate(document[section]):
            layer_index, result_index = item.get("layer_index"), item.get("result_index")
            if layer_index is not None and layer_index not in layer_indexes:
                raise StoreError(f"not a valid specprof run export at {section}/{position}: "
                                 f"no layer with index {layer_index}",
                                 "export it again with: specprof export --run ID -o run.json")
            if result_index is not None and not 0 <= result_index < n_results:
                raise StoreError(f"not a valid specprof run export at {section}/{position}: "
                                 f"no result {result_index}",
                                 "export it again with: specprof export --run ID -o run.json")


def export_schema() -> dict[str, Any]:
    """The JSON Schema of a run export (``specprof.schemas/run-export.schema.json``)."""
    text_ = importlib.resources.files("specprof.schemas").joinpath(EXPORT_SCHEMA).read_text()
    return json.loads(text_)


def validate_export(document: Any) -> None:
    """Raise a one-line StoreError unless ``document`` is a valid run export."""
    import jsonschema

    try:
        jsonschema.validate(document, export_schema())
    except jsonschema.ValidationError as error:
        where = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        raise StoreError(f"not a valid specprof run export at {where}: {error.message}",
                         "export it with: specprof export --run ID -o run.json") from error


# --- row conversions ---------------------------------------------------------------------------


def _versions() -> dict[str, str | None]:
    """Package versions recorded with a run, so results can be traced to the code that made them."""
    found: dict[str, str | None] = {}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def _layer_row(model_id: int, position: int, layer: Layer) -> LayerRow:
    def listed(shape: Sequence[int] | None) -> list[int] | None:
        return None if shape is None else [int(size) for size in shape]

    return LayerRow(
        model_id=model_id, index=position, name=layer.name, op_type=layer.op_type,
        weight_shape=listed(layer.weight.shape), input_shape=listed(layer.input_shape),
        output_shape=listed(layer.output_shape), strides=listed(layer.strides),
        pads=listed(layer.pads), dilations=listed(layer.dilations),
        output_padding=listed(layer.output_padding), groups=int(layer.groups),
        weight_hash=layer.weight_hash, layer_hash=layer.content_hash,
        description=layer.describe()[:255],
    )


def _vectors_dtype(vectors: np.ndarray) -> str:
    """float32 vectors stay float32 (half the bytes); everything else is stored as float64."""
    return "<f4" if vectors.dtype == np.float32 else "<f8"


def _spectrum_columns(spectrum: Spectrum) -> dict[str, Any]:
    vectors, mult = spectrum.left_vectors, spectrum.multiplicities
    vectors_dtype = None if vectors is None else _vectors_dtype(vectors)
    return {
        "backend": spectrum.backend, "kind": spectrum.kind, "boundary": spectrum.boundary,
        "params": _jsonable(spectrum.params), "params_hash": params_hash(spectrum.params),
        "values": encode_array(spectrum.values, VALUES_DTYPE),
        "multiplicities": None if mult is None else encode_array(mult, MULTIPLICITIES_DTYPE),
        "left_vectors": None if vectors is None else encode_array(vectors, vectors_dtype or ""),
        "left_vectors_shape": None if vectors is None else list(vectors.shape),
        "left_vectors_dtype": vectors_dtype, "n_values": spectrum.n_values,
        "sigma_max": _finite(spectrum.sigma_max), "sigma_min": _finite(spectrum.sigma_min),
        "frobenius": _finite(spectrum.frobenius), "stable_rank": _finite(spectrum.stable_rank),
        "upper_bound": spectrum.upper_bound, "lower_bound": spectrum.lower_bound,
        "exact": spectrum.exact, "seconds": spectrum.seconds, "device": spectrum.device,
    }


def _row_spectrum(row: SpectrumRow) -> Spectrum:
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
    )


def _query_statement(values: bool) -> Select[Any]:
    s = SpectrumRow
    columns = [
        s.id.label("spectrum_id"), s.run_id.label("run"), ModelRow.name.label("model"),
        LayerRow.name.label("layer"), LayerRow.index.label("layer_index"), LayerRow.op_type,
        LayerRow.weight_shape, LayerRow.input_shape, s.backend, s.kind, s.boundary, s.status,
        s.message, s.n_values, s.sigma_max, s.sigma_min, s.frobenius, s.stable_rank,
        s.upper_bound, s.lower_bound, s.exact, s.seconds, s.device,
    ]
    if values:  # the blobs are only read when asked for
        columns += [s.values, s.multiplicities]
    return (select(*columns).join(RunRow, s.run_id == RunRow.id)
            .join(LayerRow, s.layer_id == LayerRow.id).join(ModelRow, LayerRow.model_id == ModelRow.id))


def _query_filters(model: str | None, layer: str | None, backend: str | None, kind: str | None,
                   run: int | None) -> list[ColumnElement[bool]]:
    filters: list[ColumnElement[bool]] = []
    if model is not None:
        filters.append(ModelRow.name.ilike(glob_to_like(model), escape="\\"))
    if layer is not None:
        filters.append(LayerRow.name.ilike(glob_to_like(layer), escape="\\"))
    if backend is not None:
        filters.append(SpectrumRow.backend == backend)
    if kind is not None:
        filters.append(SpectrumRow.kind == kind)
    if run is not None:
        filters.append(SpectrumRow.run_id == run)
    return filters


def _query_record(row: Any, values: bool) -> dict[str, Any]:
    record = {name: row[name] for name in QUERY_COLUMNS if name in row}
    record["shape"] = _shape_text(row["weight_shape"])
    record["input_shape"] = _shape_text(row["input_shape"])
    if values:
        record["singular_values"] = _expanded_values(row["values"], row["multiplicities"])
    return record


def _expanded_values(values: bytes | None, multiplicities: bytes | None) -> list[float] | None:
    if values is None:
        return None
    array = decode_array(values, VALUES_DTYPE)
    if multiplicities is not None:
        array = np.repeat(array, decode_array(multiplicities, MULTIPLICITIES_DTYPE))
    return [float(value) for value in array]


def load_spectrum(spectrum_id: int, db: str | None = None, *, expand: bool = True) -> np.ndarray:
    """The singular values of stored spectrum ``spectrum_id``, descending, as a NumPy array.

    With ``expand`` (the default) each value is repeated by its multiplicity, so the array has
    ``n_values`` entries; ``expand=False`` gives the distinct values only.
    """
    with Store.open(db) as store:
        spectrum = store.load_spectrum(spectrum_id)
    return spectrum.expanded() if expand else np.array(spectrum.values)
