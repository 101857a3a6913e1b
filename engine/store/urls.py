"""Where the database is: the default file, ``--db`` URLs, engines, and one-line errors."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Connection, Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from specprof.engine.errors import StoreError
from specprof.engine.jsonable import jsonable

BUSY_TIMEOUT_S = 30
"""How long a SQLite writer waits for another process's write lock before giving up."""

PG_CONNECT_TIMEOUT_S = 10


MEMORY_ENV = "SPECPROF_ALLOW_MEMORY_DB"
"""Set to 1 to allow an in-memory SQLite URL (results vanish when the process ends)."""
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(?!\\)")
"""A URL scheme (two letters or more, so a Windows drive 'C:' is not one)."""


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
    scheme = _SCHEME.match(db)
    if scheme and "://" not in db:  # 'postgresql:/x', 'sqlite:x.db': a typo, not a file name
        raise StoreError(f"{db!r} is neither a file path nor a database URL (a URL needs "
                         f"'{scheme.group(1)}://')",
                         "e.g. --db results.db, or postgresql://user@host/db, or "
                         "sqlite:////abs/path.db")
    if "://" not in db:
        return f"sqlite:///{Path(db).expanduser().absolute()}"
    for prefix in ("postgresql://", "postgres://"):
        if db.startswith(prefix):
            return "postgresql+psycopg://" + db[len(prefix):]
    return db


def parse_url(db: str | None) -> URL:
    """``resolve_url`` as a SQLAlchemy URL; a StoreError if it is not one."""
    text_url = resolve_url(db)
    try:
        url = make_url(text_url)
    except ArgumentError as error:
        raise StoreError(f"not a database URL: {text_url!r}",
                         "pass a file path or a URL like postgresql://user@host/db") from error
    if url.get_backend_name() == "sqlite" and (url.database or "") in ("", ":memory:") \
            and os.environ.get(MEMORY_ENV) != "1":
        raise StoreError(f"{text_url!r} is an in-memory SQLite database: every result would be "
                         "lost when the command ends",
                         f"give a file (--db results.db), or set {MEMORY_ENV}=1 if that is "
                         "what you want")
    return url


def is_sqlite_file(url: URL) -> bool:
    """A SQLite database in a named file (not in memory, not a ``file:`` URI)."""
    database = url.database or ""
    return url.get_backend_name() == "sqlite" and database not in ("", ":memory:") and \
        not database.startswith("file:")


# --- errors ------------------------------------------------------------------------------------


def connection_hint(reason: str, url: URL) -> str:
    """What to try when the database at ``url`` failed with ``reason``."""
    low = reason.lower()
    if "password" in low or "authentication" in low:
        return "check the user name and password in the --db URL"
    if url.get_backend_name() == "sqlite":
        return "check that the file's folder exists and is writable, or pass --db with another path"
    if "refused" in low or "timeout" in low or "could not" in low or "resolve" in low:
        return "check that the server is running and the URL's host and port, or pass another --db URL"
    return "check the --db URL and that the database is reachable and writable"


def store_error(action: str, url: URL, error: BaseException) -> StoreError:
    """A database or file-system failure as one line, with the URL's password masked."""
    cause = getattr(error, "orig", None) or error
    lines = str(cause).strip().splitlines()
    reason = lines[0] if lines else type(cause).__name__
    if url.password:
        reason = reason.replace(str(url.password), "***")
    shown = url.render_as_string(hide_password=True)
    return StoreError(f"cannot {action} database {shown}: {reason}", connection_hint(reason, url))


@contextmanager
def guarded(action: str, url: URL) -> Iterator[None]:
    """Database and file-system failures reach the user as one StoreError line."""
    try:
        yield
    except StoreError:
        raise
    except (SQLAlchemyError, OSError) as error:
        raise store_error(action, url, error) from error


# --- engines -----------------------------------------------------------------------------------


def configure_sqlite(engine: Engine) -> None:
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


def plain_parameters(_connection: Connection, _cursor: Any, statement: str, parameters: Any,
                     _context: Any, _executemany: bool) -> tuple[str, Any]:
    """numpy scalars in bound parameters as Python numbers. Ids often come from a query
    DataFrame as numpy integers, which the drivers do not take (sqlite3 would even bind an
    ``np.int64`` as an 8-byte blob and silently match nothing)."""
    return statement, jsonable(parameters, bind=True)


def create_store_engine(url: URL) -> Engine:
    """An engine for ``url``: SQLite configured for concurrent writers, others with timeouts."""
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})
        configure_sqlite(engine)
    else:
        connect_args: dict[str, Any] = {}
        if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
        try:
            engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
        except (NoSuchModuleError, ModuleNotFoundError) as error:
            raise StoreError(f"no database driver for {url.drivername}: {error}",
                             "for PostgreSQL run: pip install 'specprof[postgres]'") from error
    event.listen(engine, "before_cursor_execute", plain_parameters, retval=True)
    return engine
