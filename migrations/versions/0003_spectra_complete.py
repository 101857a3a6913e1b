"""Partial spectra: ``spectra.complete``, and the column in the ``layer_summary`` view.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03

- ``spectra.complete``: false when only the largest singular values were computed (a top-k
  answer); such a row's ``sigma_min`` and ``stable_rank`` are NULL. Existing rows were all
  computed whole, so the column is added with default true.
- ``layer_summary`` gains ``complete`` (after ``exact``), so SQL users can tell an unknown
  ``sigma_min`` from a missing one.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here, like 0002's: this revision creates the same views whatever later code looks like.
_LAYER_SUMMARY_SELECT = """
SELECT s.id AS spectrum_id, s.run_id AS run_id, r.status AS run_status,
       m.id AS model_id, m.name AS model, m.sha256 AS model_sha256,
       l.id AS layer_id, l."index" AS layer_index, l.name AS layer, l.op_type AS op_type,
       l.description AS description, s.backend AS backend, s.kind AS kind,
       s.boundary AS boundary, s.status AS status, s.message AS message,
       s.n_values AS n_values, s.sigma_max AS sigma_max, s.sigma_min AS sigma_min,
       s.frobenius AS frobenius, s.stable_rank AS stable_rank,
       s.upper_bound AS upper_bound, s.lower_bound AS lower_bound, s.exact AS exact,{complete}
       s.seconds AS seconds, s.device AS device, s.created_at AS created_at
FROM spectra s
JOIN runs r ON r.id = s.run_id
JOIN layers l ON l.id = s.layer_id
JOIN models m ON m.id = l.model_id
"""

LAYER_SUMMARY_SQL = "CREATE VIEW layer_summary AS" + _LAYER_SUMMARY_SELECT.format(
    complete=" s.complete AS complete,")
LAYER_SUMMARY_0002_SQL = "CREATE VIEW layer_summary AS" + _LAYER_SUMMARY_SELECT.format(
    complete="")


def upgrade() -> None:
    # Plain ALTER, not batch mode: recreating ``spectra`` on SQLite would cascade to analyses.
    op.add_column("spectra", sa.Column("complete", sa.Boolean(), nullable=False,
                                       server_default=sa.true()))
    op.execute("DROP VIEW IF EXISTS layer_summary")
    op.execute(LAYER_SUMMARY_SQL)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS layer_summary")
    op.drop_column("spectra", "complete")  # SQLite >= 3.35 drops a column in place
    op.execute(LAYER_SUMMARY_0002_SQL)
