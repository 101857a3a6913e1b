"""The results store: models, layers, runs and spectra in SQLite or PostgreSQL.

SQLite is the default (one file at a per-user path, nothing to start); any SQLAlchemy URL works,
PostgreSQL through psycopg 3. The schema is created and changed only by the Alembic migrations
in ``specprof.migrations``: a new, empty database is migrated on first use, an existing one with
an older schema is never upgraded silently (``specprof db upgrade`` does it).

Every write is one transaction, so a run killed at any point leaves only whole layer results.
Arrays are stored as little-endian bytes (see ``specprof.engine.db_models``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import json
import math
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
    Engine,
    Select,
    case,
    create_engine,
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
    Base,
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


def _create_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})
        _configure_sqlite(engine)
        return engine
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
    try:
        return create_engine(url, connect_args=connect_args, pool_pre_ping=True)
    except (NoSuchModuleError, ModuleNotFoundError) as error:
        raise StoreError(f"no database driver for {url.drivername}: {error}",
                         "for PostgreSQL run: pip install 'specprof[postgres]'") from error


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
                    pass  # another process stored the same model first: use theirs
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
                     versions=_versions(), host=socket.gethostname())
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
              values: bool = False, limit: int | None = None) -> pd.DataFrame:
        """Stored layer results, newest run first, then by layer position.

        ``model`` and ``layer`` are case-insensitive globs (``*``, ``?``) on the names. With
        ``values`` a ``singular_values`` column holds every value, descending, each repeated by
        its multiplicity (None for skipped or failed layers).
        """
        stmt = _query_statement(values).where(*_query_filters(model, layer, backend, kind, run))
        stmt = stmt.order_by(RunRow.id.desc(), LayerRow.index, SpectrumRow.id).limit(limit)
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

    def counts(self) -> dict[str, int]:
        """Rows per table (models, layers, runs, spectra)."""
        tables = {"models": ModelRow, "layers": LayerRow, "runs": RunRow, "spectra": SpectrumRow}
        with self._guarded("read"), self._read() as session:
            return {name: int(session.scalar(select(func.count()).select_from(table)) or 0)
                    for name, table in tables.items()}


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
