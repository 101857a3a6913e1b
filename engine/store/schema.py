"""The schema's state: Alembic configured in code, the revisions, migrating, version checks.

The schema is created and changed only by the migrations in ``specprof.migrations``. A new,
empty database is migrated on first use; an existing one with an older schema is never upgraded
silently (``specprof db upgrade`` does it).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text

from specprof.engine.db_models import Base
from specprof.engine.errors import StoreError

VERSION_TABLE = "specprof_alembic_version"
"""Alembic's version table; named for us so a shared database can hold other apps' histories."""

PG_MIGRATION_LOCK = 0x5EC7_0001
"""Any constant works: concurrent first openers of one PostgreSQL database take turns migrating."""


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


def known_revisions() -> set[str]:
    """Every schema revision this specprof knows."""
    script = ScriptDirectory.from_config(alembic_config())
    return {revision.revision for revision in script.walk_revisions()}


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at (None: no schema yet)."""
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def is_new_database(connection: Connection) -> bool:
    """A database without our version table and without any of our tables."""
    tables = set(inspect(connection).get_table_names())
    return not tables & ({VERSION_TABLE} | set(Base.metadata.tables))


def take_migration_lock(connection: Connection) -> None:
    """On PostgreSQL, wait for any other process migrating the same database (until commit)."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK})


def migrate(connection: Connection) -> None:
    """Upgrade to head inside the caller's transaction."""
    command.upgrade(alembic_config(connection), "head")


def check_revision(connection: Connection, shown_url: str) -> None:
    """Raise unless the schema is exactly this specprof's head revision."""
    revision, head = current_revision(connection), head_revision()
    if revision == head:
        return
    if revision is not None and revision not in known_revisions():
        raise StoreError(f"database was written by a newer specprof (schema {revision}, this "
                         f"specprof knows up to {head}): {shown_url}",
                         "run: pip install --upgrade specprof")
    raise StoreError(f"database schema is older ({revision or 'none'}) than this specprof ({head}): "
                     f"{shown_url}", f"run: specprof db upgrade --db {shown_url}")
