"""Alembic environment for specprof, run programmatically by ``specprof.engine.store``.

There is no alembic.ini: the store builds an ``alembic.config.Config`` in code and passes an
open connection in ``config.attributes["connection"]``, so migrations run inside the caller's
transaction (all or nothing). Running ``alembic`` by hand works too when ``sqlalchemy.url`` is
set on the config.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from specprof.engine.db_models import Base

# Our own version table, so a PostgreSQL database shared with another Alembic-managed
# application does not mix the two histories.
VERSION_TABLE = "specprof_alembic_version"


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        # SQLite cannot ALTER most things: batch mode recreates the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(context.config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.begin() as owned:
            _run(owned)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("specprof migrations run online only (offline SQL scripts are not supported)")
run_migrations_online()
