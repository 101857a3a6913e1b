"""Initial schema: models, layers, runs, spectra.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ_DATETIME = sa.DateTime(timezone=True)


def _create_models() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("format", sa.String(length=32), nullable=False),
        sa.Column("framework", sa.String(length=64), nullable=False),
        sa.Column("opset", sa.Integer(), nullable=False),
        sa.Column("n_params", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TZ_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("sha256", name=op.f("uq_models_sha256")),
    )


def _create_layers() -> None:
    op.create_table(
        "layers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=512), nullable=False),
        sa.Column("op_type", sa.String(length=32), nullable=False),
        sa.Column("weight_shape", sa.JSON(), nullable=False),
        sa.Column("input_shape", sa.JSON(), nullable=True),
        sa.Column("output_shape", sa.JSON(), nullable=True),
        sa.Column("strides", sa.JSON(), nullable=False),
        sa.Column("pads", sa.JSON(), nullable=False),
        sa.Column("dilations", sa.JSON(), nullable=False),
        sa.Column("output_padding", sa.JSON(), nullable=False),
        sa.Column("groups", sa.Integer(), nullable=False),
        sa.Column("weight_hash", sa.String(length=64), nullable=False),
        sa.Column("layer_hash", sa.String(length=64), nullable=False),
        sa.Column("description", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE",
                                name=op.f("fk_layers_model_id_models")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_layers")),
        sa.UniqueConstraint("model_id", "index", name="uq_layers_model_id_index"),
    )
    op.create_index(op.f("ix_layers_model_id"), "layers", ["model_id"])
    op.create_index(op.f("ix_layers_layer_hash"), "layers", ["layer_hash"])


def _create_runs() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("versions", sa.JSON(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("started_at", TZ_DATETIME, nullable=False),
        sa.Column("finished_at", TZ_DATETIME, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint("status IN ('running', 'complete', 'failed', 'interrupted')",
                           name=op.f("ck_runs_status")),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE",
                                name=op.f("fk_runs_model_id_models")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
    )
    op.create_index(op.f("ix_runs_model_id"), "runs", ["model_id"])


def _spectra_columns() -> list[sa.Column]:
    nullable_floats = ["sigma_max", "sigma_min", "frobenius", "stable_rank", "upper_bound",
                       "lower_bound"]
    return [
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("layer_id", sa.Integer(), nullable=False),
        sa.Column("layer_hash", sa.String(length=64), nullable=False),
        sa.Column("backend", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=True),
        sa.Column("boundary", sa.String(length=16), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("params_hash", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("values", sa.LargeBinary(), nullable=True),
        sa.Column("multiplicities", sa.LargeBinary(), nullable=True),
        sa.Column("left_vectors", sa.LargeBinary(), nullable=True),
        sa.Column("left_vectors_shape", sa.JSON(), nullable=True),
        sa.Column("left_vectors_dtype", sa.String(length=8), nullable=True),
        sa.Column("n_values", sa.BigInteger(), nullable=True),
        *[sa.Column(name, sa.Float(), nullable=True) for name in nullable_floats],
        sa.Column("exact", sa.Boolean(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("device", sa.String(length=32), nullable=True),
        sa.Column("created_at", TZ_DATETIME, nullable=False),
    ]


def _create_spectra() -> None:
    op.create_table(
        "spectra",
        *_spectra_columns(),
        sa.CheckConstraint("status IN ('ok', 'skipped', 'failed')", name=op.f("ck_spectra_status")),
        sa.CheckConstraint("kind IN ('operator', 'filter')", name=op.f("ck_spectra_kind")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE",
                                name=op.f("fk_spectra_run_id_runs")),
        sa.ForeignKeyConstraint(["layer_id"], ["layers.id"], ondelete="CASCADE",
                                name=op.f("fk_spectra_layer_id_layers")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_spectra")),
    )
    for column in ("run_id", "layer_id", "sigma_max", "sigma_min", "frobenius", "stable_rank"):
        op.create_index(op.f(f"ix_spectra_{column}"), "spectra", [column])
    op.create_index("ix_spectra_dedupe", "spectra", ["layer_hash", "backend", "params_hash"])


def upgrade() -> None:
    _create_models()
    _create_layers()
    _create_runs()
    _create_spectra()


def downgrade() -> None:
    for table in ("spectra", "runs", "layers", "models"):
        op.drop_table(table)
