"""Analyses and hypergraphs, the run's process id (stale-run detection), and the SQL views.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02

- ``analyses``: per-layer (or per-run, layer_id NULL) metrics written by analyzer plugins.
- ``hypergraphs``: a hypergraph per (run, analyzer, name) as JSON incidence + properties.
- ``runs.pid``: the operating-system process id of the run's writer, so a later ``Store.open`` on
  the same host can tell a run killed with ``kill -9`` (status still 'running') from a live one.
- views ``layer_summary`` and ``run_summary`` for sqlite3/psql users (docs/database.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ_DATETIME = sa.DateTime(timezone=True)

# Plain, portable SQL (SQLite and PostgreSQL). Frozen here, not imported from the package, so
# this revision creates the same views whatever later code looks like.
LAYER_SUMMARY_SQL = """
CREATE VIEW layer_summary AS
SELECT s.id AS spectrum_id, s.run_id AS run_id, r.status AS run_status,
       m.id AS model_id, m.name AS model, m.sha256 AS model_sha256,
       l.id AS layer_id, l."index" AS layer_index, l.name AS layer, l.op_type AS op_type,
       l.description AS description, s.backend AS backend, s.kind AS kind,
       s.boundary AS boundary, s.status AS status, s.message AS message,
       s.n_values AS n_values, s.sigma_max AS sigma_max, s.sigma_min AS sigma_min,
       s.frobenius AS frobenius, s.stable_rank AS stable_rank,
       s.upper_bound AS upper_bound, s.lower_bound AS lower_bound, s.exact AS exact,
       s.seconds AS seconds, s.device AS device, s.created_at AS created_at
FROM spectra s
JOIN runs r ON r.id = s.run_id
JOIN layers l ON l.id = s.layer_id
JOIN models m ON m.id = l.model_id
"""

RUN_SUMMARY_SQL = """
CREATE VIEW run_summary AS
SELECT r.id AS run_id, m.id AS model_id, m.name AS model, r.status AS status, r.host AS host,
       r.started_at AS started_at, r.finished_at AS finished_at,
       (SELECT COUNT(*) FROM layers l WHERE l.model_id = r.model_id) AS n_layers,
       COUNT(s.id) AS n_results,
       SUM(CASE WHEN s.status = 'ok' THEN 1 ELSE 0 END) AS n_ok,
       SUM(CASE WHEN s.status = 'skipped' THEN 1 ELSE 0 END) AS n_skipped,
       SUM(CASE WHEN s.status = 'failed' THEN 1 ELSE 0 END) AS n_failed,
       MAX(s.sigma_max) AS max_sigma_max,
       SUM(s.seconds) AS seconds,
       r.error AS error
FROM runs r
JOIN models m ON m.id = r.model_id
LEFT JOIN spectra s ON s.run_id = r.id
GROUP BY r.id, m.id, m.name, r.status, r.host, r.started_at, r.finished_at, r.model_id, r.error
"""


def _create_analyses() -> None:
    op.create_table(
        "analyses",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("layer_id", sa.Integer(), nullable=True),
        sa.Column("spectrum_id", sa.Integer(), nullable=True),
        sa.Column("analyzer", sa.String(length=64), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("params_hash", sa.String(length=64), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", TZ_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE",
                                name=op.f("fk_analyses_run_id_runs")),
        sa.ForeignKeyConstraint(["layer_id"], ["layers.id"], ondelete="CASCADE",
                                name=op.f("fk_analyses_layer_id_layers")),
        sa.ForeignKeyConstraint(["spectrum_id"], ["spectra.id"], ondelete="SET NULL",
                                name=op.f("fk_analyses_spectrum_id_spectra")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_analyses")),
    )
    op.create_index("ix_analyses_run_analyzer", "analyses", ["run_id", "analyzer"])
    op.create_index(op.f("ix_analyses_layer_id"), "analyses", ["layer_id"])
    op.create_index(op.f("ix_analyses_spectrum_id"), "analyses", ["spectrum_id"])


def _create_hypergraphs() -> None:
    op.create_table(
        "hypergraphs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("analyzer", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("incidence", sa.JSON(), nullable=False),
        sa.Column("edge_properties", sa.JSON(), nullable=False),
        sa.Column("node_properties", sa.JSON(), nullable=False),
        sa.Column("created_at", TZ_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE",
                                name=op.f("fk_hypergraphs_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hypergraphs")),
    )
    op.create_index(op.f("ix_hypergraphs_run_id"), "hypergraphs", ["run_id"])


def upgrade() -> None:
    _create_analyses()
    _create_hypergraphs()
    # Plain ALTER, not batch mode: recreating ``runs`` on SQLite would cascade-delete spectra.
    op.add_column("runs", sa.Column("pid", sa.Integer(), nullable=True))
    op.execute(LAYER_SUMMARY_SQL)
    op.execute(RUN_SUMMARY_SQL)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS run_summary")
    op.execute("DROP VIEW IF EXISTS layer_summary")
    op.drop_column("runs", "pid")  # SQLite >= 3.35 drops a column in place
    op.drop_table("hypergraphs")
    op.drop_table("analyses")
