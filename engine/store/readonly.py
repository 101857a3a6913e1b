"""Read-only SQL over the views ``layer_summary`` and ``run_summary``, for people who write it.

The guarantees come from the database, not from parsing the text:
- SQLite: the file is opened with ``mode=ro`` (a URI), so no statement can write; an
  authorizer allows only SELECT reads of the two views (and of the tables *through* them);
  a progress handler stops a statement after ``timeout_s``.
- PostgreSQL: each statement runs in its own ``READ ONLY`` transaction with a
  ``statement_timeout``, and is rolled back. Which tables a statement may read is the
  database role's business (give a shared server a role with SELECT on the views only).

One statement per call (a ``;`` inside is refused, so a statement cannot end the read-only
transaction and start another), at most ``max_rows`` rows, and user values only as bound
parameters. Every failure is a one-line ``StoreError``.
"""

from __future__ import annotations

import sqlite3
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from specprof.engine.errors import StoreError
from specprof.engine.store.urls import create_store_engine, is_sqlite_file, parse_url

VIEWS = ("layer_summary", "run_summary")
MAX_ROWS = 10_000
STATEMENT_TIMEOUT_S = 5.0
MAX_SQL_CHARS = 10_000
_SQL_HINT = "write one SELECT over layer_summary or run_summary (see docs/database.md)"

# sqlite3 authorizer action codes a SELECT over the views needs.
_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_FUNCTION,
                    getattr(sqlite3, "SQLITE_RECURSIVE", 33)}


@dataclass(frozen=True)
class SqlResult:
    """The answer to one statement: column names, rows (at most ``max_rows``), and whether
    there were more."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool


def _authorize(action: int, first: str | None, column: str | None, _database: str | None,
               view: str | None) -> int:
    """SQLite authorizer: SELECT, functions, and reads of the views or through them.

    SQLite also reports reads of a view's tables with an empty column name and no view (for
    row counting when it flattens the view): those read no values, so they pass.
    """
    if action in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_READ and (first in VIEWS or view in VIEWS or column == ""):
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def check_statement(sql: str) -> str:
    """The statement without surrounding space and a final ``;``; a StoreError when it is
    empty, too long, or holds more than one statement."""
    statement = sql.strip().rstrip(";").strip()
    if not statement:
        raise StoreError("the SQL statement is empty", _SQL_HINT)
    if len(statement) > MAX_SQL_CHARS:
        raise StoreError(f"the SQL statement is longer than {MAX_SQL_CHARS} characters",
                         _SQL_HINT)
    if ";" in statement:
        raise StoreError("only one SQL statement at a time (no ';' inside)", _SQL_HINT)
    return statement


class ReadOnlyDatabase:
    """Read-only SQL access to the results database at ``db`` (a path or URL, as ``--db``)."""

    def __init__(self, db: str | None, *, timeout_s: float = STATEMENT_TIMEOUT_S,
                 max_rows: int = MAX_ROWS) -> None:
        self.url = parse_url(db)
        self.timeout_s = timeout_s
        self.max_rows = max_rows
        self.display_url = self.url.render_as_string(hide_password=True)
        self._path: Path | None = None
        self._engine: Engine | None = None
        if self.url.get_backend_name() == "sqlite":
            if not is_sqlite_file(self.url):
                raise StoreError(f"read-only SQL needs a SQLite file, not {self.display_url}",
                                 "pass --db with the path of a database file")
            self._path = Path(self.url.database or "").absolute()
            if not self._path.is_file():
                raise StoreError(f"no database file at {self._path}",
                                 "profile a model first, or pass --db with another path")
        elif self.url.get_backend_name() == "postgresql":
            self._engine = create_store_engine(self.url)
        else:
            raise StoreError(f"read-only SQL supports SQLite and PostgreSQL, not "
                             f"{self.url.get_backend_name()}", "pass another --db")

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> SqlResult:
        """Run one read-only statement with bound ``params`` (``:name`` placeholders)."""
        statement = check_statement(sql)
        try:
            if self._path is not None:
                return self._sqlite(statement, dict(params or {}))
            return self._postgres(statement, dict(params or {}))
        except (sqlite3.Error, SQLAlchemyError) as error:
            cause = getattr(error, "orig", None) or error
            lines = str(cause).strip().splitlines()
            reason = lines[0] if lines else type(cause).__name__
            if "interrupted" in reason or "statement timeout" in reason:
                reason = f"stopped after {self.timeout_s:g} s ({reason})"
            raise StoreError(f"SQL failed: {reason}", _SQL_HINT) from error

    def _sqlite(self, statement: str, params: dict[str, Any]) -> SqlResult:
        assert self._path is not None
        uri = f"file:{urllib.parse.quote(str(self._path))}?mode=ro"
        connection = sqlite3.connect(uri, uri=True, timeout=self.timeout_s,
                                     check_same_thread=False)
        try:
            connection.set_authorizer(_authorize)
            deadline = time.monotonic() + self.timeout_s
            connection.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
            cursor = connection.execute(statement, params)
            rows = cursor.fetchmany(self.max_rows + 1)
            columns = [d[0] for d in cursor.description or []]
        finally:
            connection.close()
        return SqlResult(columns, [tuple(r) for r in rows[:self.max_rows]],
                         len(rows) > self.max_rows)

    def _postgres(self, statement: str, params: dict[str, Any]) -> SqlResult:
        assert self._engine is not None
        with self._engine.connect() as connection:
            with connection.begin() as transaction:
                connection.exec_driver_sql("SET TRANSACTION READ ONLY")
                connection.exec_driver_sql(
                    f"SET LOCAL statement_timeout = {int(self.timeout_s * 1000)}")
                result = connection.execute(text(statement), params)
                columns = list(result.keys())
                rows = result.fetchmany(self.max_rows + 1)
                transaction.rollback()
        return SqlResult(columns, [tuple(r) for r in rows[:self.max_rows]],
                         len(rows) > self.max_rows)
