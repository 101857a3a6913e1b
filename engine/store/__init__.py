"""The results store: models, layers, runs and spectra in SQLite or PostgreSQL.

SQLite is the default (one file at a per-user path, nothing to start); any SQLAlchemy URL works,
PostgreSQL through psycopg 3. The schema is created and changed only by the Alembic migrations
in ``specprof.migrations``: a new, empty database is migrated on first use, an existing one with
an older schema is never upgraded silently (``specprof db upgrade`` does it).

Every write is one transaction, so a run killed at any point leaves only whole layer results.
Arrays are stored as little-endian bytes (see ``specprof.engine.db_models``).

The modules, each one job: ``urls`` (where the database is, engines, one-line errors),
``schema`` (migrations and revision checks), ``filters`` (what a query may ask), ``rows``
(rows to and from Spectrum and Layer), ``exchange`` (export and import documents), ``store``
(the ``Store`` class). Everything other code uses is importable from here.
"""

from __future__ import annotations

from specprof.engine.errors import StoreError
from specprof.engine.jsonable import jsonable
from specprof.engine.store.exchange import (
    EXPORT_FORMAT,
    EXPORT_SCHEMA,
    EXPORT_VERSION,
    EXPORT_VERSIONS,
    MAX_EXPORT_BYTES,
    MAX_EXPORT_DEPTH,
    VERSIONED_PACKAGES,
    check_depth,
    check_export_references,
    export_schema,
    package_versions,
    parse_export,
    read_export,
    validate_export,
)
from specprof.engine.store.filters import (
    QUERY_COLUMNS,
    SORT_COLUMNS,
    WHERE_COLUMNS,
    glob_to_like,
    parse_where,
)
from specprof.engine.store.rows import (
    MULTIPLICITIES_DTYPE,
    VALUES_DTYPE,
    decode_array,
    encode_array,
    params_hash,
    spectrum_identity,
    spectrum_params_hash,
)
from specprof.engine.store.schema import (
    VERSION_TABLE,
    alembic_config,
    head_revision,
    migrations_dir,
)
from specprof.engine.store.store import Store, load_spectrum
from specprof.engine.store.urls import (
    BUSY_TIMEOUT_S,
    PG_CONNECT_TIMEOUT_S,
    default_db_path,
    resolve_url,
)

json_clean = jsonable
"""The store's former name for ``specprof.engine.jsonable.jsonable``."""

__all__ = [
    "BUSY_TIMEOUT_S",
    "EXPORT_FORMAT",
    "EXPORT_SCHEMA",
    "EXPORT_VERSION",
    "EXPORT_VERSIONS",
    "MAX_EXPORT_BYTES",
    "MAX_EXPORT_DEPTH",
    "MULTIPLICITIES_DTYPE",
    "PG_CONNECT_TIMEOUT_S",
    "QUERY_COLUMNS",
    "SORT_COLUMNS",
    "VALUES_DTYPE",
    "VERSIONED_PACKAGES",
    "VERSION_TABLE",
    "WHERE_COLUMNS",
    "Store",
    "StoreError",
    "alembic_config",
    "check_depth",
    "check_export_references",
    "decode_array",
    "default_db_path",
    "encode_array",
    "export_schema",
    "glob_to_like",
    "head_revision",
    "json_clean",
    "jsonable",
    "load_spectrum",
    "migrations_dir",
    "package_versions",
    "params_hash",
    "parse_export",
    "parse_where",
    "read_export",
    "resolve_url",
    "spectrum_identity",
    "spectrum_params_hash",
    "validate_export",
]
