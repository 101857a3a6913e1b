"""The ``Store``: one connection to a results database, and every read and write of it.

Every write is one transaction, so a run killed at any point leaves only whole layer results.
The helpers live beside it: URLs and engines (``urls``), the schema (``schema``), query
conditions (``filters``), row conversions (``rows``), export and import (``exchange``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from sqlalchemy import Connection, Engine, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from specprof.engine.db_models import (
    RESULT_STATUSES,
    RUN_STATUSES,
    AnalysisRow,
    Base,
    HypergraphRow,
    LayerRow,
    ModelRow,
    RunRow,
    SpectrumRow,
    utcnow,
)
from specprof.engine.errors import StoreError
from specprof.engine.jsonable import jsonable
from specprof.engine.store import exchange, schema
from specprof.engine.store.filters import (
    analyses_statement,
    comparison,
    describe_runs,
    hypergraphs_statement,
    id_equals,
    is_row_id,
    parse_where,
    query_filters,
    query_statement,
    runs_matching,
    runs_statement,
    sort_order,
)
from specprof.engine.store.rows import (
    analyses_frame,
    layer_row,
    params_hash,
    query_frame,
    row_spectrum,
    spectrum_columns,
    spectrum_params_hash,
)
from specprof.engine.store.urls import create_store_engine, guarded, is_sqlite_file, parse_url
from specprof.engine.types import LoadedModel, Spectrum

if TYPE_CHECKING:
    import pandas as pd

RowT = TypeVar("RowT", bound=Base)

_RUNS_HINT = "list runs with: specprof runs"


class Store:
    """A connection to one results database. Use ``Store.open``; close it (or use ``with``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._read = sessionmaker(engine, expire_on_commit=False)
        # On SQLite, write transactions take the write lock up front (see urls.configure_sqlite).
        self._write = sessionmaker(engine.execution_options(sqlite_begin="IMMEDIATE"),
                                   expire_on_commit=False)

    # lifecycle ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, db: str | None = None, *, check_schema: bool = True) -> Store:
        """Open (and, if new and empty, create) the database at ``db`` (see ``resolve_url``).

        With ``check_schema`` (the default) an existing database must be at this specprof's
        schema revision; ``check_schema=False`` is for ``upgrade()`` only.
        """
        url = parse_url(db)
        with guarded("open", url):
            if is_sqlite_file(url):
                Path(url.database or "").parent.mkdir(parents=True, exist_ok=True)
            store = cls(create_store_engine(url))
        try:
            store._prepare(check_schema)
            if check_schema:
                store.mark_stale_runs()
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def upgrade_url(cls, db: str | None = None) -> tuple[str | None, str]:
        """``specprof db upgrade``: bring the database at ``db`` to head; (before, after)."""
        with cls.open(db, check_schema=False) as store:
            return store.upgrade()

    def _prepare(self, check_schema: bool) -> None:
        with self._guarded("open"), self._write_connection() as connection:
            schema.take_migration_lock(connection)
            if schema.is_new_database(connection):
                schema.migrate(connection)
            elif check_schema:
                schema.check_revision(connection, self.display_url)

    def upgrade(self) -> tuple[str | None, str]:
        """Migrate the schema to head in one transaction; returns (revision before, after)."""
        with self._guarded("upgrade"), self._write_connection() as connection:
            schema.take_migration_lock(connection)
            before = schema.current_revision(connection)
            if before is not None and before not in schema.known_revisions():
                schema.check_revision(connection, self.display_url)
            schema.migrate(connection)
            return before, schema.head_revision()

    def revision(self) -> str | None:
        """The schema revision the database is at (None: no schema)."""
        with self._guarded("read"), self.engine.connect() as connection:
            return schema.current_revision(connection)

    @property
    def display_url(self) -> str:
        """The database URL with its password masked, for messages."""
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _guarded(self, action: str) -> Any:
        return guarded(action, self.engine.url)

    @contextmanager
    def _write_connection(self) -> Iterator[Connection]:
        with self.engine.execution_options(sqlite_begin="IMMEDIATE").begin() as connection:
            yield connection

    def _missing(self, what: str, ident: Any, hint: str = _RUNS_HINT) -> StoreError:
        return StoreError(f"no {what} {ident} in {self.display_url}", hint)

    @staticmethod
    def _get(session: Session, table: type[RowT], ident: Any) -> RowT | None:
        """The row with id ``ident``, or None (also for a number no row id can be)."""
        return session.get(table, int(ident)) if is_row_id(ident) else None

    def _run_row(self, session: Session, run_id: int) -> RunRow:
        row = self._get(session, RunRow, run_id)
        if row is None:
            raise self._missing("run", run_id)
        return row

    # writes ------------------------------------------------------------------------------------

    def add_model(self, model: LoadedModel) -> tuple[int, list[int]]:
        """Get or create ``model`` (by content hash) and its layers; (model id, layer ids)."""
        sha256 = model.content_hash
        with self._guarded("write to"):
            if self._model_id(sha256) is None:
                try:
                    self._insert_model(model, sha256)
                except IntegrityError:
                    # Another process stored the same model first: use theirs. Any other
                    # integrity problem leaves no model behind and is raised.
                    if self._model_id(sha256) is None:
                        raise
            return self._model_and_layer_ids(sha256)

    def _model_id(self, sha256: str) -> int | None:
        with self._read() as session:
            return session.scalar(select(ModelRow.id).where(ModelRow.sha256 == sha256))

    def _insert_model(self, model: LoadedModel, sha256: str) -> None:
        with self._write.begin() as session:
            row = ModelRow(sha256=sha256, name=model.name, format=model.format,
                           framework=model.framework, opset=model.opset, n_params=model.n_params)
            session.add(row)
            session.flush()
            session.add_all(layer_row(row.id, position, layer)
                            for position, layer in enumerate(model.layers))

    def _model_and_layer_ids(self, sha256: str) -> tuple[int, list[int]]:
        with self._read() as session:
            model_id = session.scalar(select(ModelRow.id).where(ModelRow.sha256 == sha256))
            assert model_id is not None, "model vanished between insert and read"
            layer_ids = session.scalars(select(LayerRow.id).where(LayerRow.model_id == model_id)
                                        .order_by(LayerRow.index)).all()
            return model_id, list(layer_ids)

    def start_run(self, model_id: int, config: dict[str, Any]) -> int:
        """Record a new run of ``model_id`` with status running; returns its id."""
        row = RunRow(model_id=model_id, status="running", config=jsonable(config),
                     versions=exchange.package_versions(), host=socket.gethostname(),
                     pid=os.getpid())
        with self._guarded("write to"), self._write.begin() as session:
            session.add(row)
            session.flush()
            return row.id

    def finish_run(self, run_id: int, status: str, error: str | None = None) -> None:
        """Mark a run complete, failed or interrupted (with the error, if any)."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {RUN_STATUSES}, not {status!r}")
        with self._guarded("write to"), self._write.begin() as session:
            row = self._run_row(session, run_id)
            row.status, row.error, row.finished_at = status, error, utcnow()

    def add_spectrum(self, run_id: int, layer_id: int, spectrum: Spectrum) -> int:
        """Store one computed spectrum, in one transaction; returns its id."""
        row = SpectrumRow(run_id=run_id, layer_id=layer_id, status="ok",
                          message=spectrum.note or None, **spectrum_columns(spectrum))
        return self._add_result(row)

    def add_layer_result(self, run_id: int, layer_id: int, backend: str, kind: str | None,
                         status: str, message: str) -> int:
        """Store that a layer was skipped or failed, and why; returns the row id."""
        if status not in RESULT_STATUSES or status == "ok":
            raise ValueError(f"status must be 'skipped' or 'failed', not {status!r}")
        row = SpectrumRow(run_id=run_id, layer_id=layer_id, backend=backend, kind=kind,
                          status=status, message=message, params={},
                          params_hash=spectrum_params_hash({}))
        return self._add_result(row)

    def _add_result(self, row: SpectrumRow) -> int:
        with self._guarded("write to"), self._write.begin() as session:
            layer = self._get(session, LayerRow, row.layer_id)
            if layer is None:
                raise self._missing("layer", row.layer_id, "store the model with add_model first")
            if not is_row_id(row.run_id):
                raise self._missing("run", row.run_id)
            row.layer_hash = layer.layer_hash
            session.add(row)
            session.flush()
            return row.id

    # reads -------------------------------------------------------------------------------------

    def find_spectrum(self, layer_hash: str, backend: str, params: dict[str, Any]) -> Spectrum | None:
        """The newest stored ok spectrum of this layer content, backend and parameters.

        Only the identity keys of ``params`` (``Request.IDENTITY``) count: a stored spectrum
        whose parameters also hold a backend's own extras is found for the same request.
        """
        stmt = (select(SpectrumRow)
                .where(SpectrumRow.layer_hash == layer_hash, SpectrumRow.backend == backend,
                       SpectrumRow.params_hash == spectrum_params_hash(params),
                       SpectrumRow.status == "ok")
                .order_by(SpectrumRow.id.desc()).limit(1))
        with self._guarded("read"), self._read() as session:
            row = session.scalar(stmt)
            return None if row is None else row_spectrum(row)

    def load_spectrum(self, spectrum_id: int) -> Spectrum:
        """The stored spectrum ``spectrum_id`` with its values, multiplicities and vectors."""
        with self._guarded("read"), self._read() as session:
            row = self._get(session, SpectrumRow, spectrum_id)
        if row is None:
            raise self._missing("spectrum", spectrum_id, "see: specprof query")
        if row.status != "ok" or row.values is None:
            raise StoreError(f"spectrum {spectrum_id} has no values (status {row.status}: "
                             f"{row.message})", "profile the layer with another backend")
        return row_spectrum(row)

    def query(self, *, model: str | None = None, layer: str | None = None,
              backend: str | None = None, kind: str | None = None, run: int | None = None,
              values: bool = False, limit: int | None = None, where: str | None = None,
              sort: str | None = None) -> pd.DataFrame:
        """Stored layer results, newest run first, then by layer position.

        ``model`` and ``layer`` are case-insensitive globs (``*``, ``?``) on the names. With
        ``values`` a ``singular_values`` column holds every value, descending, each repeated by
        its multiplicity (None for skipped or failed layers). ``where`` filters on summary
        columns (``"sigma_max > 3 and stable_rank <= 10"``, see ``parse_where``); ``sort`` names
        a column to order by first, descending with a leading ``-`` (``"-sigma_max"``).
        """
        if limit is not None and not 0 < limit < 2**63:
            raise StoreError(f"--limit {limit} is out of range",
                             "give a positive number of rows below 2^63")
        filters = query_filters(model, layer, backend, kind, run)
        filters += [comparison(column, op, number) for column, op, number in parse_where(where)]
        stmt = query_statement(values).where(*filters)
        stmt = stmt.order_by(*sort_order(sort), RunRow.id.desc(), LayerRow.index,
                             SpectrumRow.id).limit(limit)
        return query_frame(self._mappings(stmt), values)

    def runs(self) -> pd.DataFrame:
        """One row per run, newest first: id, model, status, times and result counts."""
        columns = ["id", "model", "status", "started", "finished", "n_spectra", "n_skipped",
                   "n_failed", "error"]
        return self._frame(runs_statement(), columns)

    def latest_run(self, model: str | None = None, status: str | None = "complete") -> int | None:
        """The newest run id, of models matching the glob ``model`` and with ``status`` (None:
        any status); None when there is no such run."""
        with self._guarded("read"), self._read() as session:
            return session.scalar(runs_matching(model, status).limit(1))

    def find_run(self, *, run: int | None = None, model: str | None = None,
                 backend: str | None = None, kind: str | None = None,
                 status: str | None = "complete", model_id: int | None = None) -> int:
        """The run to read: ``run`` itself when given (it must exist), else the newest run
        whose model matches ``model`` (an exact name or a case-insensitive glob) and, when
        given, has id ``model_id`` (the same content), with ``status`` (None: any) and, when
        ``backend`` or ``kind`` is given, ok results of that backend and kind.

        A one-line StoreError when there is no such run, saying what was looked for.
        """
        if run is not None:
            with self._guarded("read"), self._read() as session:
                return int(self._run_row(session, run).id)
        stmt = runs_matching(model, status, model_id, backend, kind)
        with self._guarded("read"), self._read() as session:
            found = session.scalar(stmt.limit(1))
        if found is None:
            raise StoreError(f"no {describe_runs(model, backend, kind, status)} in "
                             f"{self.display_url}",
                             "profile the model first (specprof profile MODEL_FILE), or "
                             + _RUNS_HINT)
        return int(found)

    def run_info(self, run_id: int) -> dict[str, Any]:
        """Everything recorded about one run: model, status, config, versions, host, times."""
        with self._guarded("read"), self._read() as session:
            found = session.execute(select(RunRow, ModelRow.name)
                                    .join(ModelRow, RunRow.model_id == ModelRow.id)
                                    .where(id_equals(RunRow.id, run_id))).first()
        if found is None:
            raise self._missing("run", run_id)
        row, model_name = found
        return {"id": row.id, "model": model_name, "model_id": row.model_id, "status": row.status,
                "config": dict(row.config or {}), "versions": dict(row.versions or {}),
                "host": row.host, "pid": row.pid, "started_at": row.started_at,
                "finished_at": row.finished_at, "error": row.error}

    def layers(self, model_id: int) -> pd.DataFrame:
        """The stored layer rows of one model, by position (one column per ``layers`` column)."""
        columns = [column.name for column in LayerRow.__table__.columns]
        stmt = (select(LayerRow.__table__).where(id_equals(LayerRow.model_id, model_id))
                .order_by(LayerRow.index))
        return self._frame(stmt, columns)

    def spectra_for_run(self, run_id: int, *, backend: str | None = None,
                        kind: str | None = None) -> list[tuple[dict[str, Any], Spectrum]]:
        """The ok spectra of a run by layer position: (layer row as a dict, plus its
        ``spectrum_id``; the decoded Spectrum). What analyzers read."""
        stmt = (select(SpectrumRow, LayerRow).join(LayerRow, SpectrumRow.layer_id == LayerRow.id)
                .where(id_equals(SpectrumRow.run_id, run_id), SpectrumRow.status == "ok"))
        if backend is not None:
            stmt = stmt.where(SpectrumRow.backend == backend)
        if kind is not None:
            stmt = stmt.where(SpectrumRow.kind == kind)
        columns = [column.name for column in LayerRow.__table__.columns]
        with self._guarded("read"), self._read() as session:
            found = session.execute(stmt.order_by(LayerRow.index, SpectrumRow.id)).all()
            return [({**{name: getattr(layer, name) for name in columns},
                      "spectrum_id": spectrum.id}, row_spectrum(spectrum))
                    for spectrum, layer in found]

    def _mappings(self, stmt: Any) -> Sequence[Any]:
        with self._guarded("read"), self.engine.connect() as connection:
            return connection.execute(stmt).mappings().all()

    def _frame(self, stmt: Any, columns: list[str]) -> pd.DataFrame:
        """The rows of ``stmt`` as a DataFrame with ``columns`` (also when there are none)."""
        import pandas as pd  # lazily: opening a store for writes should not pay for pandas

        return pd.DataFrame([dict(row) for row in self._mappings(stmt)], columns=columns)

    # analyses and hypergraphs ------------------------------------------------------------------

    def add_analysis(self, run_id: int, analyzer: str, params: dict[str, Any],
                     rows: list[dict[str, Any]]) -> list[int]:
        """Store an analyzer's metrics for a run in one transaction; returns the new row ids.

        Each row is ``{"layer_id": int | None, "spectrum_id": int | None, "metrics": dict}``.
        Rows stored earlier for the same run, analyzer and parameters are replaced in the same
        transaction, so re-running an analysis never leaves two answers or none.
        """
        digest = params_hash(params)
        with self._guarded("write to"), self._write.begin() as session:
            self._run_row(session, run_id)
            session.execute(delete(AnalysisRow).where(AnalysisRow.run_id == run_id,
                                                      AnalysisRow.analyzer == analyzer,
                                                      AnalysisRow.params_hash == digest))
            new = [AnalysisRow(run_id=run_id, layer_id=row.get("layer_id"),
                               spectrum_id=row.get("spectrum_id"), analyzer=analyzer,
                               params=jsonable(params), params_hash=digest,
                               metrics=jsonable(row.get("metrics", {}))) for row in rows]
            session.add_all(new)
            session.flush()
            return [row.id for row in new]

    def analyses(self, *, run: int | None = None, analyzer: str | None = None,
                 model: str | None = None) -> pd.DataFrame:
        """Stored analysis metrics, newest run first then by layer position: columns
        analysis_id, run, model, layer, layer_index, analyzer, params, created_at, then one
        column per metric key (``model`` is a glob)."""
        return analyses_frame(self._mappings(analyses_statement(run, analyzer, model)))

    def add_hypergraph(self, run_id: int, analyzer: str, name: str, params: dict[str, Any],
                       incidence: dict[str, list[str]], edge_properties: dict[str, Any] | None = None,
                       node_properties: dict[str, Any] | None = None) -> int:
        """Store one hypergraph of a run (``incidence``: {edge name: [node names]}); its id.

        An earlier hypergraph of the same run, analyzer, name and parameters is replaced in the
        same transaction, as ``add_analysis`` replaces its rows.
        """
        row = HypergraphRow(run_id=run_id, analyzer=analyzer, name=name, params=jsonable(params),
                            incidence=jsonable({str(edge): [str(node) for node in nodes]
                                                for edge, nodes in incidence.items()}),
                            edge_properties=jsonable(edge_properties or {}),
                            node_properties=jsonable(node_properties or {}))
        with self._guarded("write to"), self._write.begin() as session:
            self._run_row(session, run_id)
            earlier = session.scalars(select(HypergraphRow).where(
                HypergraphRow.run_id == run_id, HypergraphRow.analyzer == analyzer,
                HypergraphRow.name == name)).all()
            for old in earlier:  # JSON is not comparable in SQL on every database
                if old.params == row.params:
                    session.delete(old)
            session.add(row)
            session.flush()
            return row.id

    def hypergraphs(self, *, run: int | None = None, analyzer: str | None = None) -> pd.DataFrame:
        """Stored hypergraphs without their (big) JSON: hypergraph_id, run, model, analyzer,
        name, params, created_at; newest first."""
        columns = ["hypergraph_id", "run", "model", "analyzer", "name", "params", "created_at"]
        return self._frame(hypergraphs_statement(run, analyzer), columns)

    def load_hypergraph(self, hypergraph_id: int) -> dict[str, Any]:
        """Every field of one stored hypergraph."""
        with self._guarded("read"), self._read() as session:
            row = self._get(session, HypergraphRow, hypergraph_id)
        if row is None:
            raise self._missing("hypergraph", hypergraph_id, "list them with Store.hypergraphs()")
        return {"id": row.id, "run_id": row.run_id, "analyzer": row.analyzer, "name": row.name,
                "params": row.params, "incidence": row.incidence,
                "edge_properties": row.edge_properties, "node_properties": row.node_properties,
                "created_at": row.created_at}

    # interrupted runs --------------------------------------------------------------------------

    def mark_stale_runs(self) -> list[int]:
        """Mark 'running' runs whose writer process on this host is gone as interrupted.

        A run killed with ``kill -9`` (or by a crash of the machine's power) cannot close
        itself; its host and pid say whether it still can. Runs of other hosts are left alone
        (we cannot see their processes). Returns the ids marked.
        """
        host = socket.gethostname()
        stmt = select(RunRow.id, RunRow.pid).where(RunRow.status == "running", RunRow.host == host,
                                                   RunRow.pid.is_not(None))
        with self._guarded("read"), self._read() as session:
            candidates = session.execute(stmt).all()
        dead = [run_id for run_id, pid in candidates if not _process_alive(pid)]
        if dead:
            with self._guarded("write to"), self._write.begin() as session:
                for row in session.scalars(select(RunRow).where(RunRow.id.in_(dead),
                                                                RunRow.status == "running")):
                    row.status, row.finished_at = "interrupted", utcnow()
                    row.error = f"process {row.pid} on {host} ended without closing the run"
        return dead

    def resumable_run(self, model_id: int, config: dict[str, Any],
                      ignore: Sequence[str] = ("force", "resume")) -> int | None:
        """The newest interrupted or failed run of ``model_id`` with the same configuration
        (apart from the ``ignore`` keys), which ``profile --resume`` continues; else None."""
        wanted = {k: v for k, v in jsonable(config).items() if k not in ignore}
        stmt = (select(RunRow.id, RunRow.config)
                .where(id_equals(RunRow.model_id, model_id),
                       RunRow.status.in_(("interrupted", "failed")))
                .order_by(RunRow.id.desc()))
        with self._guarded("read"), self._read() as session:
            for run_id, stored in session.execute(stmt):
                if {k: v for k, v in (stored or {}).items() if k not in ignore} == wanted:
                    return int(run_id)
        return None

    def reopen_run(self, run_id: int) -> None:
        """Set an interrupted or failed run running again, owned by this process."""
        with self._guarded("write to"), self._write.begin() as session:
            row = self._run_row(session, run_id)
            row.status, row.error, row.finished_at = "running", None, None
            row.host, row.pid = socket.gethostname(), os.getpid()

    def run_results(self, run_id: int) -> dict[tuple[int, str], tuple[str, int]]:
        """What a run already stored: (layer id, backend) -> (status, result row id)."""
        stmt = select(SpectrumRow.layer_id, SpectrumRow.backend, SpectrumRow.status,
                      SpectrumRow.id).where(id_equals(SpectrumRow.run_id, run_id))
        with self._guarded("read"), self._read() as session:
            return {(layer_id, backend): (status, row_id)
                    for layer_id, backend, status, row_id in session.execute(stmt)}

    # lifecycle: delete, export, import -------------------------------------------------------

    def delete(self, *, run: int | None = None, model: str | None = None) -> dict[str, int]:
        """Delete one run, or every model named ``model`` (exact name) with its layers, runs and
        results, in one transaction; returns how many runs and results went."""
        if (run is None) == (model is None):
            raise StoreError("delete needs exactly one of a run id or a model name",
                             "pass --run ID or --model NAME")
        with self._guarded("delete from"), self._write.begin() as session:
            if run is not None:
                what, model_ids = f"run {run}", []
                run_ids = list(session.scalars(select(RunRow.id).where(id_equals(RunRow.id, run))))
                found = bool(run_ids)
            else:
                what = f"model {model!r}"
                model_ids = list(session.scalars(select(ModelRow.id).where(ModelRow.name == model)))
                run_ids = list(session.scalars(select(RunRow.id)
                                               .where(RunRow.model_id.in_(model_ids))))
                found = bool(model_ids)
            if not found:
                raise StoreError(f"no {what} in {self.display_url}", _RUNS_HINT)
            n_results = int(session.scalar(select(func.count()).select_from(SpectrumRow)
                                           .where(SpectrumRow.run_id.in_(run_ids))) or 0)
            # The foreign keys cascade to spectra, analyses and hypergraphs (and layers).
            if run is not None:
                session.execute(delete(RunRow).where(RunRow.id.in_(run_ids)))
            else:
                session.execute(delete(ModelRow).where(ModelRow.id.in_(model_ids)))
            return {"runs": len(run_ids), "results": n_results}

    def export_run(self, run_id: int) -> dict[str, Any]:
        """A whole run (model, layers, results, analyses, hypergraphs) as one JSON document
        following ``schemas/run-export.schema.json``; arrays are base64 of their bytes."""
        def rows(table: Any, *where: Any, order: Any) -> list[Any]:
            return list(session.scalars(select(table).where(*where).order_by(order)))

        with self._guarded("read"), self._read() as session:
            run = self._run_row(session, run_id)
            model = session.get(ModelRow, run.model_id)
            assert model is not None
            return exchange.export_document(
                model, rows(LayerRow, LayerRow.model_id == model.id, order=LayerRow.index), run,
                rows(SpectrumRow, SpectrumRow.run_id == run.id, order=SpectrumRow.id),
                rows(AnalysisRow, AnalysisRow.run_id == run.id, order=AnalysisRow.id),
                rows(HypergraphRow, HypergraphRow.run_id == run.id, order=HypergraphRow.id))

    def import_run(self, document: dict[str, Any]) -> int:
        """Store a document made by ``export_run`` as a new run, in one transaction; its id.

        The whole document is checked (JSON Schema, references, values) before anything is
        written. The model is matched by its content hash (created if absent; its layers must
        then agree hash for hash).
        """
        plan = exchange.plan_import(document)
        with self._guarded("write to"), self._write.begin() as session:
            return exchange.write_import(session, plan, self.display_url)

    def import_file(self, path: str | os.PathLike[str]) -> int:
        """``import_run`` of the export file ``path``, read with ``exchange.read_export``'s
        limits (size, nesting depth, UTF-8)."""
        return self.import_run(exchange.read_export(path))

    def counts(self) -> dict[str, int]:
        """Rows per table (models, layers, runs, spectra)."""
        tables = {"models": ModelRow, "layers": LayerRow, "runs": RunRow, "spectra": SpectrumRow}
        with self._guarded("read"), self._read() as session:
            return {name: int(session.scalar(select(func.count()).select_from(table)) or 0)
                    for name, table in tables.items()}


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie, killed but not yet reaped by
    its parent, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): signal 0 said it exists
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def load_spectrum(spectrum_id: int, db: str | None = None, *, expand: bool = True) -> np.ndarray:
    """The singular values of stored spectrum ``spectrum_id``, descending, as a NumPy array.

    With ``expand`` (the default) each value is repeated by its multiplicity, so the array has
    ``n_values`` entries; ``expand=False`` gives the distinct values only.
    """
    with Store.open(db) as store:
        spectrum = store.load_spectrum(spectrum_id)
    return spectrum.expanded() if expand else np.array(spectrum.values)
