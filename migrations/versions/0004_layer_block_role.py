"""Transformer checkpoints: ``layers.block`` and ``layers.role``, and both in ``layer_summary``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

- ``layers.block``: the transformer block index read from the layer's name (``layers.12.``,
  ``h.12.``, ``blk.12.``); NULL when the name has none.
- ``layers.role``: what the layer does in its block (q, k, v, qkv, o, up, gate, down,
  embedding, head, other), read from its name; NULL for rows written before this revision.
- ``layer_summary`` gains ``block`` and ``role`` (after ``layer``).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here, like 0003's: this revision creates the same view whatever later code looks like.
_LAYER_SUMMARY_SELECT = """
SELECT s.id AS spectrum_id, s.run_id AS run_id, r.status AS run_status,
       m.id AS model_id, m.name AS model, m.sha256 AS model_sha256,
       l.id AS layer_id, l."index" AS layer_index, l.name AS layer,{names} l.op_type AS op_type,
       l.description AS description, s.backend AS backend, s.kind AS kind,
       s.boundary AS boundary, s.status AS status, s.message AS message,
       s.n_values AS n_values, s.sigma_max AS sigma_max, s.sigma_min AS sigma_min,
       s.frobenius AS frobenius, s.stable_rank AS stable_rank,
       s.upper_bound AS upper_bound, s.lower_bound AS lower_bound, s.exact AS exact,
       s.complete AS complete,
       s.seconds AS seconds, s.device AS device, s.created_at AS created_at
FROM spectra s
JOIN runs r ON r.id = s.run_id
JOIN layers l ON l.id = s.layer_id
JOIN models m ON m.id = l.model_id
"""

LAYER_SUMMARY_SQL = "CREATE VIEW layer_summary AS" + _LAYER_SUMMARY_SELECT.format(
    names=" l.block AS block, l.role AS role,")
LAYER_SUMMARY_0003_SQL = "CREATE VIEW layer_summary AS" + _LAYER_SUMMARY_SELECT.format(names="")


def upgrade() -> None:
    # Plain ALTER, not batch mode: recreating ``layers`` on SQLite would cascade to spectra.
    op.execute("DROP VIEW IF EXISTS layer_summary")
    op.add_column("layers", sa.Column("block", sa.Integer(), nullable=True))
    op.add_column("layers", sa.Column("role", sa.String(16), nullable=True))
    op.execute(LAYER_SUMMARY_SQL)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS layer_summary")
    op.drop_column("layers", "role")  # SQLite >= 3.35 drops a column in place
    op.drop_column("layers", "block")
    op.execute(LAYER_SUMMARY_0003_SQL)
