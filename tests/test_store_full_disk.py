"""A database that fills up in the middle of a run: one line, and no half-written rows.

A full disk is simulated with SQLite's own limit on the database size (``PRAGMA
max_page_count``): the write that would grow the file past it fails with SQLITE_FULL, the same
error a full file system gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import event

from specprof.engine.errors import StoreError
from specprof.engine.plugins import Registry
from specprof.engine.profile import ProfileConfig, profile_model
from specprof.engine.store import Store
from specprof.engine.types import Layer, LoadedModel


def _model() -> LoadedModel:
    rng = np.random.default_rng(3)
    layers = tuple(Layer(name=f"fc{i}", op_type="Gemm", weight=rng.normal(size=(300, 300)),
                         input_shape=(300,), index=i) for i in range(4))
    return LoadedModel(name="big", format="onnx", framework="onnx", opset=18, layers=layers)


def test_a_full_database_stops_the_run_with_one_line_and_keeps_whole_rows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/full.db"
    model = _model()
    with Store.open(url) as store:
        store.add_model(model)
        with store.engine.connect() as connection:
            pages = connection.exec_driver_sql("PRAGMA page_count").scalar()

        # Room for the run row and about one layer's result (300 values + 300x300 vectors
        # from the filter backend is ~720 KB; the exact backend's 300 values are 2.4 KB).
        @event.listens_for(store.engine, "connect")
        def _cap(dbapi_connection: object, _record: object) -> None:
            cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
            cursor.execute(f"PRAGMA max_page_count = {pages + 200}")
            cursor.close()

        store.engine.dispose()  # new connections get the cap
        with pytest.raises(StoreError) as caught:
            profile_model(model, ProfileConfig(backends=("filter",)), store,
                          Registry.from_manager())
    message = caught.value.one_line()
    assert "\n" not in message and "full" in message.lower()
    with Store.open(url) as store:
        frame = store.query(values=True)
        runs = store.runs()
        vectors = [store.load_spectrum(i).left_vectors for i in frame.spectrum_id]
    assert 0 < len(frame) < len(model.layers)  # stopped mid-run
    for row, u in zip(frame.itertuples(), vectors, strict=True):
        assert row.status == "ok" and len(row.singular_values) == row.n_values == 300
        assert u is not None and u.shape == (300, 300)
    assert runs.status.tolist() == ["failed"]
