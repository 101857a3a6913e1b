"""The results database's tables, as SQLAlchemy 2.0 declarative models.

The schema is created and changed only by the Alembic migrations in ``specprof.migrations``;
these classes describe it for queries and let a test check that the migrations and the models
agree. Types are portable (SQLite and PostgreSQL): JSON, LargeBinary, timezone-aware DateTime.

Arrays are stored as raw bytes, not one row per value:
- ``spectra.values``: little-endian float64 (``<f8``), descending.
- ``spectra.multiplicities``: little-endian int64 (``<i8``), same length; NULL = each value once.
- ``spectra.left_vectors``: little-endian, dtype in ``left_vectors_dtype`` (``<f4`` or ``<f8``),
  C order, shape in ``left_vectors_shape``.

``spectra.complete`` is false for a partial spectrum (only the largest values, e.g. top-k):
its ``sigma_min`` and ``stable_rank`` are then NULL, unknown rather than wrong.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names, so later migrations can alter constraints by name on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

RUN_STATUSES = ("running", "complete", "failed", "interrupted")
RESULT_STATUSES = ("ok", "skipped", "failed")
SPECTRUM_KINDS = ("operator", "filter")


def utcnow() -> datetime:
    """Timestamps are stored in UTC so runs from hosts in different time zones sort right."""
    return datetime.now(UTC)


def _one_of(column: str, allowed: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(value) for value in allowed)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ModelRow(Base):
    """A model, identified by the sha256 of its layers' content (not its file or name)."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(32))
    framework: Mapped[str] = mapped_column(String(64))
    opset: Mapped[int] = mapped_column(Integer)
    n_params: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LayerRow(Base):
    """One linear layer of a model; ``index`` is its position in the model's layer list."""

    __tablename__ = "layers"
    __table_args__ = (UniqueConstraint("model_id", "index", name="uq_layers_model_id_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(512))
    op_type: Mapped[str] = mapped_column(String(32))
    weight_shape: Mapped[list[int]] = mapped_column(JSON)
    input_shape: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    output_shape: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    strides: Mapped[list[int]] = mapped_column(JSON)
    pads: Mapped[list[int]] = mapped_column(JSON)
    dilations: Mapped[list[int]] = mapped_column(JSON)
    output_padding: Mapped[list[int]] = mapped_column(JSON)
    groups: Mapped[int] = mapped_column(Integer)
    weight_hash: Mapped[str] = mapped_column(String(64))
    layer_hash: Mapped[str] = mapped_column(String(64), index=True)
    description: Mapped[str] = mapped_column(String(255))
    block: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Transformer block index read from the name (``layers.12.``); NULL when none."""
    role: Mapped[str | None] = mapped_column(String(16), nullable=True)
    """q, k, v, qkv, o, up, gate, down, embedding, head or other (``engine.naming``)."""


class RunRow(Base):
    """One ``specprof profile`` invocation on one model."""

    __tablename__ = "runs"
    __table_args__ = (CheckConstraint(_one_of("status", RUN_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    versions: Mapped[dict[str, Any]] = mapped_column(JSON)
    host: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The writer's process id (with ``host``): a 'running' run whose process is gone was killed.
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)


class SpectrumRow(Base):
    """One layer result of one run: a spectrum (status ok) or why there is none."""

    __tablename__ = "spectra"
    __table_args__ = (
        CheckConstraint(_one_of("status", RESULT_STATUSES), name="status"),
        CheckConstraint(_one_of("kind", SPECTRUM_KINDS), name="kind"),
        # The dedupe lookup: same layer content, backend and parameters.
        Index("ix_spectra_dedupe", "layer_hash", "backend", "params_hash"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    layer_id: Mapped[int] = mapped_column(ForeignKey("layers.id", ondelete="CASCADE"), index=True)
    layer_hash: Mapped[str] = mapped_column(String(64))
    backend: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str | None] = mapped_column(String(16), nullable=True)  # None: no backend
    boundary: Mapped[str | None] = mapped_column(String(16), nullable=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    params_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    values: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    multiplicities: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    left_vectors: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    left_vectors_shape: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    left_vectors_dtype: Mapped[str | None] = mapped_column(String(8), nullable=True)
    n_values: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    sigma_max: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    sigma_min: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    frobenius: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    stable_rank: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    upper_bound: Mapped[float | None] = mapped_column(Float, nullable=True)
    lower_bound: Mapped[float | None] = mapped_column(Float, nullable=True)
    exact: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    # False: only the largest values were computed (top-k); sigma_min, stable_rank are NULL.
    complete: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    device: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AnalysisRow(Base):
    """Metrics an analyzer computed for one layer (or the whole run, ``layer_id`` NULL)."""

    __tablename__ = "analyses"
    __table_args__ = (Index("ix_analyses_run_analyzer", "run_id", "analyzer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    layer_id: Mapped[int | None] = mapped_column(ForeignKey("layers.id", ondelete="CASCADE"),
                                                 nullable=True, index=True)
    spectrum_id: Mapped[int | None] = mapped_column(
        ForeignKey("spectra.id", ondelete="SET NULL"), nullable=True, index=True)
    analyzer: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    params_hash: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class HypergraphRow(Base):
    """A hypergraph an analyzer built from a run: ``incidence`` is {edge: [node, ...]}."""

    __tablename__ = "hypergraphs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    analyzer: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(255))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    incidence: Mapped[dict[str, list[str]]] = mapped_column(JSON)
    edge_properties: Mapped[dict[str, Any]] = mapped_column(JSON)
    node_properties: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
