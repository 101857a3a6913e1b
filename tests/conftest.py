"""Shared fixtures: an isolated default database, and database URLs for SQLite and PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

PG_SERVER = os.environ.get("SPECPROF_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(autouse=True)
def _isolated_data_home(tmp_path_factory: pytest.TempPathFactory,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may touch the user's own database: the default path points into a temp dir."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("data-home")))
    # Nor its cache: each test session's normalized models go to a temp dir.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache-home")))
    monkeypatch.delenv("SPECPROF_CACHE_DIR", raising=False)
    monkeypatch.delenv("SPECPROF_NORMALIZE_CACHE", raising=False)
    monkeypatch.delenv("SPECPROF_DB", raising=False)
    monkeypatch.delenv("SPECPROF_DISABLED_PLUGINS", raising=False)


def _postgres_reachable() -> str | None:
    """None when the server answers, else why not."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(PG_SERVER)
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("select 1"))
        engine.dispose()
    except Exception as error:  # any failure to connect means: no server for these tests
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return None


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The PostgreSQL server URL; skips locally without a server, fails in CI (CI=true)."""
    problem = _postgres_reachable()
    if problem is not None:
        message = f"PostgreSQL not reachable at {PG_SERVER} ({problem})"
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run should have started it")
        pytest.skip(message + "; start it with .ci/ensure-postgres")
    return PG_SERVER


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A URL whose search_path is a fresh schema, dropped after the test."""
    import sqlalchemy

    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(postgres_server)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f'create schema "{schema}"'))
    try:
        yield f"{postgres_server}?options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text(f'drop schema "{schema}" cascade'))
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> str:
    """Each test using this runs once on a SQLite file and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/specprof.db"
    return request.getfixturevalue("postgres_url")
