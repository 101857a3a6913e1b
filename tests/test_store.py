"""The results store, run against a SQLite file and the PostgreSQL server (``db_url`` fixture).

Models, layers and spectra are built directly (no importers), so these tests exercise the store
alone. Databases are created by the migrations, as in production.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from specprof.engine.db_models import Base
from specprof.engine.errors import StoreError
from specprof.engine.store import (
    VERSION_TABLE,
    Store,
    alembic_config,
    default_db_path,
    glob_to_like,
    resolve_url,
)
from specprof.engine.types import Layer, LoadedModel, Spectrum

TABLES = {"models", "layers", "runs", "spectra"}


def make_model(name: str = "net", seed: int = 0, layer_names: tuple[str, ...] = ("conv1", "fc"),
               ) -> LoadedModel:
    """A small model whose content (and so its hash) depends only on ``seed``."""
    rng = np.random.default_rng(seed)
    layers = []
    for index, layer_name in enumerate(layer_names):
        if layer_name.startswith("fc"):
            layers.append(Layer(layer_name, "Gemm", rng.standard_normal((10, 16)),
                                input_shape=(16,), index=index))
        else:
            layers.append(Layer(layer_name, "Conv", rng.standard_normal((16, 3, 3, 3)),
                                strides=(2, 2), pads=(1, 1, 1, 1), input_shape=(3, 8, 8),
                                output_shape=(16, 4, 4), index=index))
    return LoadedModel(name=name, format="onnx", framework="pytorch", opset=17,
                       layers=tuple(layers))


def make_spectrum(values: list[float], backend: str = "exact", kind: str = "operator",
                  **fields: object) -> Spectrum:
    return Spectrum(values=np.array(values), kind=kind, backend=backend,  # type: ignore[arg-type]
                    exact=True, params={"boundary": "zeros", "top_k": None}, **fields)  # type: ignore[arg-type]


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with Store.open(db_url) as opened:
        yield opened


def _revision(url: str) -> str | None:
    """The schema revision, read with Alembic itself rather than through the store."""
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            return context.get_current_revision()
    finally:
        engine.dispose()


def _head() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


# --- schema ------------------------------------------------------------------------------------


def test_new_database_is_created_by_the_migrations(db_url: str) -> None:
    assert _revision(db_url) is None
    with Store.open(db_url) as store:
        assert store.counts() == dict.fromkeys(TABLES, 0)
        with store.engine.connect() as connection:
            tables = set(sqlalchemy.inspect(connection).get_table_names())
            context = MigrationContext.configure(
                connection, opts={"version_table": VERSION_TABLE, "compare_type": True})
            # The migrations and the ORM models describe the same schema.
            assert compare_metadata(context, Base.metadata) == []
    assert TABLES | {VERSION_TABLE} <= tables
    assert _revision(db_url) == _head() == "0004"


def test_older_schema_refuses_to_open_until_upgraded(db_url: str) -> None:
    Store.open(db_url).close()
    engine = sqlalchemy.create_engine(db_url)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")
    engine.dispose()
    assert _revision(db_url) is None

    with pytest.raises(StoreError) as refused:
        Store.open(db_url)
    line = refused.value.one_line()
    assert "specprof db upgrade --db" in line and "\n" not in line
    assert _revision(db_url) is None  # refusing did not upgrade behind the user's back

    assert Store.upgrade_url(db_url) == (None, _head())
    with Store.open(db_url) as store:
        assert store.revision() == _head()
        assert store.counts()["models"] == 0


def fill_old_database(url: str, revision: str, row_id: int) -> None:
    """A database at ``revision`` (0001 or 0002) with one model, run and ok spectrum, written
    in plain SQL as a specprof of that schema left it, every row with id ``row_id``."""
    pid = ", pid" if revision >= "0002" else ""
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), revision)
        connection.execute(sqlalchemy.text(
            "INSERT INTO models (id, sha256, name, format, framework, opset, n_params, created_at) "
            "VALUES (:id, :sha, 'old', 'onnx', 'torch', 17, 10, '2024-01-01 00:00:00')"),
            {"id": row_id, "sha": "a" * 64})
        connection.execute(sqlalchemy.text(
            "INSERT INTO layers (id, model_id, \"index\", name, op_type, weight_shape, strides, "
            "pads, dilations, output_padding, groups, weight_hash, layer_hash, description) "
            "VALUES (:id, :id, 0, 'fc', 'Gemm', '[2, 2]', '[]', '[]', '[]', '[]', 1, :h, :h, "
            "'fc')"), {"id": row_id, "h": "b" * 64})
        connection.execute(sqlalchemy.text(
            f"INSERT INTO runs (id, model_id, status, config, versions, host, started_at{pid}) "
            f"VALUES (:id, :id, 'complete', '{{}}', '{{}}', 'h', '2024-01-01 00:00:00'"
            f"{', NULL' if pid else ''})"), {"id": row_id})
        connection.execute(sqlalchemy.text(
            "INSERT INTO spectra (id, run_id, layer_id, layer_hash, backend, kind, params, "
            "params_hash, status, \"values\", n_values, sigma_max, sigma_min, created_at) VALUES "
            "(:id, :id, :id, :h, 'exact', 'operator', '{}', :h, 'ok', :v, 2, 3.0, 1.0, "
            "'2024-01-01')"), {"id": row_id, "h": "b" * 64,
                               "v": np.array([3.0, 1.0], "<f8").tobytes()})
    engine.dispose()


def test_upgrade_from_0002_marks_stored_spectra_complete(db_url: str) -> None:
    fill_old_database(db_url, "0002", 100)
    with pytest.raises(StoreError, match="older"):
        Store.open(db_url)
    assert Store.upgrade_url(db_url) == ("0002", _head())
    with Store.open(db_url) as store:
        spectrum = store.load_spectrum(100)
        assert spectrum.complete and spectrum.sigma_min == 1.0
        frame = store.query()
        assert frame["complete"].tolist() == [True] and frame["sigma_min"].tolist() == [1.0]
        with store.engine.connect() as connection:
            row = connection.execute(sqlalchemy.text(
                "SELECT layer, sigma_min, complete FROM layer_summary")).one()
        assert (row[0], row[1], bool(row[2])) == ("fc", 1.0, True)
        # New rows of the upgraded database store partial spectra as such.
        model = make_model()
        model_id, (conv_id, _) = store.add_model(model)
        run_id = store.start_run(model_id, {})
        partial = store.add_spectrum(run_id, conv_id, make_spectrum([4.0, 2.0], complete=False))
        assert not store.load_spectrum(partial).complete


def test_downgrade_to_0002_and_upgrade_again_keep_the_data(db_url: str) -> None:
    with Store.open(db_url) as store:
        _profiled(store)
    engine = sqlalchemy.create_engine(db_url)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0002")
        columns = {column["name"] for column in sqlalchemy.inspect(connection).get_columns("spectra")}
        view = connection.execute(sqlalchemy.text("SELECT * FROM layer_summary")).mappings().all()
    engine.dispose()
    assert "complete" not in columns
    assert len(view) == 2 and "complete" not in view[0]
    assert Store.upgrade_url(db_url) == ("0002", _head())
    with Store.open(db_url) as store:
        assert store.query()["complete"].tolist() == [True, True]


def test_newer_schema_is_refused(db_url: str) -> None:
    Store.open(db_url).close()
    engine = sqlalchemy.create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(StoreError, match="newer specprof"):
        Store.open(db_url)
    with pytest.raises(StoreError, match="newer specprof"):
        Store.upgrade_url(db_url)
    assert _revision(db_url) == "9999"


# --- writes and reads --------------------------------------------------------------------------


def test_spectrum_round_trip_is_exact(store: Store) -> None:
    model_id, (conv_id, fc_id) = store.add_model(make_model())
    run_id = store.start_run(model_id, {"backend": "filter", "path": Path("/x/model.onnx")})
    rng = np.random.default_rng(1)
    vectors64 = rng.standard_normal((16, 16))
    vectors32 = rng.standard_normal((10, 10)).astype(np.float32)
    values = np.sort(rng.random(4))[::-1] * 3
    first = make_spectrum(list(values), backend="filter", kind="filter", left_vectors=vectors64,
                          multiplicities=np.array([1, 7, 2, 5]), upper_bound=3.5,
                          lower_bound=0.25, seconds=0.125, device="cpu", note="hello")
    second = make_spectrum([1e-300, 2.0**0.5, np.pi], kind="filter", backend="filter",
                           left_vectors=vectors32)
    ids = [store.add_spectrum(run_id, conv_id, first), store.add_spectrum(run_id, fc_id, second)]

    back = store.load_spectrum(ids[0])
    np.testing.assert_array_equal(back.values, first.values)
    np.testing.assert_array_equal(back.multiplicities, first.multiplicities)
    np.testing.assert_array_equal(back.left_vectors, vectors64)
    assert (back.kind, back.backend, back.exact, back.note) == ("filter", "filter", True, "hello")
    assert (back.upper_bound, back.lower_bound, back.seconds) == (3.5, 0.25, 0.125)
    assert back.params == first.params and back.n_values == 15
    back2 = store.load_spectrum(ids[1])
    assert back2.multiplicities is None and back2.left_vectors.dtype == np.float32
    np.testing.assert_array_equal(back2.left_vectors, vectors32)
    np.testing.assert_array_equal(back2.values, [np.pi, 2.0**0.5, 1e-300])


def test_runs_record_status_and_counts(store: Store) -> None:
    model_id, (conv_id, fc_id) = store.add_model(make_model())
    run_id = store.start_run(model_id, {"backend": "exact"})
    assert store.runs().loc[0, "status"] == "running"
    store.add_spectrum(run_id, conv_id, make_spectrum([2.0, 1.0]))
    store.add_layer_result(run_id, fc_id, "exact", None, "skipped", "no input shape")
    store.finish_run(run_id, "complete")
    runs = store.runs()
    assert runs.loc[0, ["id", "model", "status", "n_spectra", "n_skipped"]].tolist() == \
        [run_id, "net", "complete", 1, 1]
    assert runs.loc[0, "finished"] is not None
    assert store.counts() == {"models": 1, "layers": 2, "runs": 1, "spectra": 2}


def test_failed_write_leaves_nothing(store: Store) -> None:
    _, (conv_id, _) = store.add_model(make_model())
    before = store.counts()
    with pytest.raises(StoreError):
        store.add_spectrum(987654, conv_id, make_spectrum([1.0]))  # no such run: FK violation
    with pytest.raises(StoreError):
        store.add_spectrum(1, 987654, make_spectrum([1.0]))  # no such layer
    assert store.counts() == before


def test_model_get_or_create_by_content(store: Store) -> None:
    first = store.add_model(make_model("net", seed=0))
    renamed = store.add_model(make_model("net-reexported", seed=0))
    other = store.add_model(make_model("net", seed=1))
    assert renamed == first
    assert other[0] != first[0] and set(other[1]).isdisjoint(first[1])
    assert store.counts() == {"models": 2, "layers": 4, "runs": 0, "spectra": 0}


def test_find_spectrum_returns_newest_ok_match(store: Store) -> None:
    model = make_model()
    model_id, (conv_id, _) = store.add_model(model)
    run_id = store.start_run(model_id, {})
    layer_hash = model.layers[0].content_hash
    params = {"boundary": "zeros", "top_k": None}
    assert store.find_spectrum(layer_hash, "exact", params) is None
    store.add_spectrum(run_id, conv_id, make_spectrum([2.0]))
    store.add_spectrum(run_id, conv_id, make_spectrum([5.0]))
    store.add_layer_result(run_id, conv_id, "exact", "operator", "failed", "boom")
    found = store.find_spectrum(layer_hash, "exact", params)
    assert found is not None and found.values.tolist() == [5.0]
    assert store.find_spectrum(layer_hash, "exact", {**params, "boundary": "circular"}) is None
    assert store.find_spectrum(layer_hash, "filter", params) is None
    # The same layer content in another model is found too (dedupe is by content).
    assert store.find_spectrum(make_model("copy").layers[0].content_hash, "exact", params)


def _fill_for_queries(store: Store) -> tuple[int, int]:
    resnet = make_model("resnet_a", seed=0, layer_names=("layer1.conv", "layer2.conv", "fc"))
    other = make_model("resnetXa", seed=1, layer_names=("layer1.conv",))
    ids = {}
    for model in (resnet, other):
        model_id, layer_ids = store.add_model(model)
        run_id = store.start_run(model_id, {})
        for layer_id, value in zip(layer_ids, (3.0, 2.0, 1.0), strict=False):
            store.add_spectrum(run_id, layer_id, make_spectrum([value, value / 4]))
            store.add_spectrum(run_id, layer_id, make_spectrum([value], "filter", "filter"))
        ids[model.name] = run_id
    return ids["resnet_a"], ids["resnetXa"]


def test_query_filters_globs_and_order(store: Store) -> None:
    run_a, run_x = _fill_for_queries(store)
    everything = store.query()
    assert len(everything) == 8
    # Newest run first, then layer position.
    assert everything["run"].tolist() == [run_x] * 2 + [run_a] * 6
    assert everything["layer_index"].tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    first = everything.iloc[2]
    assert (first["model"], first["layer"], first["op_type"]) == ("resnet_a", "layer1.conv", "Conv")
    assert (first["shape"], first["input_shape"], first["sigma_max"]) == ("16x3x3x3", "3x8x8", 3.0)

    # '_' in a glob is a literal underscore, not SQL's any-character.
    assert set(store.query(model="resnet_a")["model"]) == {"resnet_a"}
    assert set(store.query(model="resnet?a")["model"]) == {"resnet_a", "resnetXa"}
    assert set(store.query(model="RESNET*")["model"]) == {"resnet_a", "resnetXa"}
    assert store.query(layer="layer?.conv", backend="exact")["layer"].tolist() == \
        ["layer1.conv", "layer1.conv", "layer2.conv"]
    assert store.query(layer="f*")["layer"].tolist() == ["fc", "fc"]
    assert set(store.query(kind="filter")["backend"]) == {"filter"}
    assert set(store.query(run=run_x)["model"]) == {"resnetXa"}
    assert store.query(model="nothing*").empty
    assert len(store.query(limit=3)) == 3


def test_query_values_expands_multiplicities(store: Store) -> None:
    model_id, (conv_id, fc_id) = store.add_model(make_model())
    run_id = store.start_run(model_id, {})
    store.add_spectrum(run_id, conv_id, make_spectrum([1.0, 3.0, 2.0],
                                                      multiplicities=np.array([1, 2, 3])))
    store.add_layer_result(run_id, fc_id, "exact", "operator", "failed", "too big")
    frame = store.query(values=True)
    assert frame.loc[0, "singular_values"] == [3.0, 3.0, 2.0, 2.0, 2.0, 1.0]
    assert frame.loc[0, "n_values"] == 6
    assert frame.loc[1, "singular_values"] is None
    assert (frame.loc[1, "status"], frame.loc[1, "message"]) == ("failed", "too big")
    assert "singular_values" not in store.query().columns


def test_load_spectrum_of_a_skipped_layer_says_so(store: Store) -> None:
    model_id, (conv_id, _) = store.add_model(make_model())
    skipped = store.add_layer_result(store.start_run(model_id, {}), conv_id, "exact", None,
                                     "skipped", "MatMul of two activations")
    with pytest.raises(StoreError, match="no values"):
        store.load_spectrum(skipped)
    with pytest.raises(StoreError, match="no spectrum"):
        store.load_spectrum(skipped + 100)


# --- opening: URLs and failures ----------------------------------------------------------------


def test_resolve_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_db_path() == tmp_path / "specprof" / "specprof.db"
    assert resolve_url(None) == f"sqlite:///{tmp_path}/specprof/specprof.db"
    monkeypatch.setenv("SPECPROF_DB", "postgres://u@h/db")
    assert resolve_url(None) == "postgresql+psycopg://u@h/db"
    assert resolve_url("postgresql://u:p@h:5/db") == "postgresql+psycopg://u:p@h:5/db"
    assert resolve_url("postgresql+psycopg2://h/db") == "postgresql+psycopg2://h/db"
    assert resolve_url(str(tmp_path / "a.db")) == f"sqlite:///{tmp_path}/a.db"
    assert resolve_url("sqlite:///rel.db") == "sqlite:///rel.db"


def test_glob_to_like() -> None:
    assert glob_to_like("layer?.*") == "layer_.%"
    assert glob_to_like("50%_a\\b") == "50\\%\\_a\\\\b"


def test_default_database_is_created_under_the_data_home(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    with Store.open() as store:
        assert store.counts()["runs"] == 0
    assert (tmp_path / "data" / "specprof" / "specprof.db").is_file()


def test_unreachable_server_is_one_line_with_the_password_masked() -> None:
    with pytest.raises(StoreError) as failure:
        Store.open("postgresql://someone:s3cret@127.0.0.1:1/test")
    line = failure.value.one_line()
    assert "\n" not in line and "127.0.0.1:1" in line and "s3cret" not in line
    assert "***" in line and "server is running" in failure.value.hint


def test_unwritable_sqlite_path_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    target = blocker / "sub" / "specprof.db"
    with pytest.raises(StoreError) as failure:
        Store.open(str(target))
    assert "\n" not in failure.value.one_line() and str(blocker) in failure.value.message
    assert blocker.read_text() == "a file where a folder should be"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["not-a-folder"]


def test_a_file_that_is_not_a_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are notes, not SQLite " * 100)
    with pytest.raises(StoreError) as failure:
        Store.open(str(path))
    assert "\n" not in failure.value.one_line()
    assert path.read_bytes() == b"these are notes, not SQLite " * 100


# --- concurrency -------------------------------------------------------------------------------

WRITER = """
import sys
import numpy as np
from specprof.engine.store import Store
from specprof.engine.types import Layer, LoadedModel, Spectrum

layers = tuple(Layer(f"fc{i}", "Gemm", np.full((3, 3), float(i)), input_shape=(3,))
               for i in range(8))
with Store.open(sys.argv[1]) as store:
    model_id, layer_ids = store.add_model(LoadedModel("m", "onnx", "numpy", 17, layers))
    run_id = store.start_run(model_id, {})
    for layer_id in layer_ids:
        store.add_spectrum(run_id, layer_id, Spectrum(np.arange(1.0, 30.0), "operator", "exact",
                                                      True))
    store.finish_run(run_id, "complete")
"""


@pytest.mark.slow
def test_concurrent_writers_lose_nothing(db_url: str, tmp_path: Path) -> None:
    """Processes that create the database, the model and their runs at once all succeed."""
    import subprocess
    import sys

    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    writers = [subprocess.Popen([sys.executable, str(script), db_url], stderr=subprocess.PIPE,
                                text=True) for _ in range(3)]
    errors = [writer.communicate(timeout=120)[1] for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0, 0], errors
    with Store.open(db_url) as store:
        assert store.counts() == {"models": 1, "layers": 8, "runs": 3, "spectra": 24}
        runs = store.runs()
        assert runs["status"].tolist() == ["complete"] * 3
        assert runs["n_spectra"].tolist() == [8] * 3


# --- analyses, hypergraphs, run reads, views (schema 0002) ------------------------------------


def _profiled(store: Store, name: str = "net", seed: int = 0) -> tuple[int, list[int]]:
    """A complete run of a two-layer model with one spectrum per layer; (run id, layer ids)."""
    model_id, layer_ids = store.add_model(make_model(name, seed))
    run_id = store.start_run(model_id, {"backends": ["exact"]})
    store.add_spectrum(run_id, layer_ids[0], make_spectrum([3.0, 2.0, 1.0]))
    store.add_spectrum(run_id, layer_ids[1], make_spectrum([5.0, 0.5], multiplicities=np.array([1, 4])))
    store.finish_run(run_id, "complete")
    return run_id, layer_ids


def test_analysis_rows_replace_earlier_ones_of_same_params(store: Store) -> None:
    run_id, layer_ids = _profiled(store)
    first = store.add_analysis(run_id, "spectral", {"bins": 10}, [
        {"layer_id": layer_ids[1], "spectrum_id": None, "metrics": {"alpha": 2.5}},
        {"layer_id": layer_ids[0], "spectrum_id": None, "metrics": {"alpha": 1.5, "ok": True}},
        {"layer_id": None, "spectrum_id": None, "metrics": {"lipschitz": float("nan")}},
    ])
    assert len(first) == 3
    store.add_analysis(run_id, "spectral", {"bins": 20}, [
        {"layer_id": layer_ids[0], "spectrum_id": None, "metrics": {"alpha": 9.0}}])
    again = store.add_analysis(run_id, "spectral", {"bins": 10}, [
        {"layer_id": layer_ids[0], "spectrum_id": None, "metrics": {"alpha": np.float64(1.75)}}])
    assert not set(again) & set(first)
    frame = store.analyses(run=run_id, analyzer="spectral")
    # bins=10 replaced (one row now), bins=20 kept.
    assert sorted(frame["alpha"].tolist()) == [1.75, 9.0]
    assert list(frame.columns[:8]) == ["analysis_id", "run", "model", "layer", "layer_index",
                                       "analyzer", "params", "created_at"]
    assert store.analyses(model="other*").empty
    assert store.analyses(model="ne?")["model"].unique().tolist() == ["net"]


def test_analysis_of_missing_run_writes_nothing(store: Store) -> None:
    with pytest.raises(StoreError, match="no run 999"):
        store.add_analysis(999, "spectral", {}, [{"layer_id": None, "metrics": {"a": 1}}])
    assert store.analyses().empty


def test_analysis_rows_are_one_transaction(store: Store) -> None:
    run_id, layer_ids = _profiled(store)
    store.add_analysis(run_id, "spectral", {}, [{"layer_id": layer_ids[0], "metrics": {"a": 1}}])
    with pytest.raises(StoreError):  # the second row names a layer that does not exist
        store.add_analysis(run_id, "spectral", {}, [
            {"layer_id": layer_ids[0], "metrics": {"a": 2}},
            {"layer_id": 10_000, "metrics": {"a": 3}}])
    # Neither the replacement's delete nor its first row happened.
    assert store.analyses(run=run_id)["a"].tolist() == [1]


def test_hypergraph_round_trip_and_listing(store: Store) -> None:
    run_id, _ = _profiled(store)
    incidence = {"img0": ["conv1:0", "conv1:3"], "img1": ["conv1:3", "fc:1"]}
    hg_id = store.add_hypergraph(run_id, "hypergraph", "per-input", {"threshold": 0.1}, incidence,
                                 edge_properties={"img0": {"label": "cat"}},
                                 node_properties={"fc:1": {"layer": "fc"}})
    listed = store.hypergraphs(run=run_id)
    assert listed["hypergraph_id"].tolist() == [hg_id]
    assert "incidence" not in listed.columns
    loaded = store.load_hypergraph(hg_id)
    assert loaded["incidence"] == incidence
    assert loaded["edge_properties"] == {"img0": {"label": "cat"}}
    assert loaded["params"] == {"threshold": 0.1} and loaded["run_id"] == run_id
    with pytest.raises(StoreError, match="no hypergraph"):
        store.load_hypergraph(hg_id + 1)


def test_run_reads_for_analyzers(store: Store) -> None:
    old_run, _ = _profiled(store, "net", seed=0)
    new_run, layer_ids = _profiled(store, "other", seed=1)
    running = store.start_run(store.run_info(new_run)["model_id"], {})
    assert store.latest_run() == new_run
    assert store.latest_run("net") == old_run
    assert store.latest_run(status=None) == running
    assert store.latest_run("nothing*") is None
    info = store.run_info(new_run)
    assert info["model"] == "other" and info["status"] == "complete"
    assert info["config"] == {"backends": ["exact"]} and "numpy" in info["versions"]
    assert store.layers(info["model_id"])["name"].tolist() == ["conv1", "fc"]
    pairs = store.spectra_for_run(new_run)
    assert [layer["name"] for layer, _ in pairs] == ["conv1", "fc"]
    assert [layer["id"] for layer, _ in pairs] == layer_ids
    assert pairs[1][1].expanded().tolist() == [5.0, 0.5, 0.5, 0.5, 0.5]
    assert store.spectra_for_run(new_run, kind="filter") == []
    with pytest.raises(StoreError, match="no run"):
        store.run_info(10_000)


def test_sql_views_answer_without_knowing_internals(store: Store) -> None:
    run_id, layer_ids = _profiled(store)
    store.add_layer_result(run_id, layer_ids[0], "fft", None, "skipped", "not circular")
    with store.engine.connect() as connection:
        rows = connection.execute(sqlalchemy.text(
            "SELECT model, layer, layer_index, backend, status, sigma_max FROM layer_summary "
            "WHERE sigma_max > 4")).all()
        summary = connection.execute(sqlalchemy.text(
            "SELECT run_id, model, status, n_layers, n_results, n_ok, n_skipped, n_failed, "
            "max_sigma_max FROM run_summary")).mappings().one()
    assert [tuple(row) for row in rows] == [("net", "fc", 1, "exact", "ok", 5.0)]
    assert dict(summary) == {"run_id": run_id, "model": "net", "status": "complete", "n_layers": 2,
                             "n_results": 3, "n_ok": 2, "n_skipped": 1, "n_failed": 0,
                             "max_sigma_max": 5.0}


def test_module_load_spectrum_returns_values(db_url: str) -> None:
    from specprof.engine.store import load_spectrum

    with Store.open(db_url) as store:
        _profiled(store)
        spectrum_id = int(store.query(layer="fc")["spectrum_id"].iloc[0])
    assert load_spectrum(spectrum_id, db_url).tolist() == [5.0, 0.5, 0.5, 0.5, 0.5]
    assert load_spectrum(spectrum_id, db_url, expand=False).tolist() == [5.0, 0.5]


# --- storage size of a ResNet-50 profile -------------------------------------------------------


def resnet50_spectrum_sizes() -> list[tuple[str, int, int]]:
    """(layer, distinct values, multiplicity per value) of ResNet-50's operator spectra at
    224x224 as the FFT/polyphase backend stores them: per frequency min(c_out, s^2 c_in) values
    on the (n/s)^2 grid, the real-kernel half grid with conjugate pairs stored once (so about
    half the values carry multiplicity 2; here all do, the size is the same), 1x1 convolutions
    as W's values each repeated (n/s)^2 times."""
    sizes = [("conv1", 12 * 112 * 57, 2)]  # 7x7/2, 3->64: 12 polyphase channels, 112^2 grid
    c_in, n_in = 64, 56  # after the max pool
    for stage, (width, blocks, n_out) in enumerate([(64, 3, 56), (128, 4, 28), (256, 6, 14),
                                                     (512, 3, 7)], start=1):
        for block in range(blocks):
            n = n_in if block == 0 else n_out  # the first block's 3x3 conv has the stride
            prefix = f"layer{stage}.{block}"
            sizes.append((f"{prefix}.conv1", min(c_in, width), n * n))
            sizes.append((f"{prefix}.conv2", width * n_out * (n_out // 2 + 1), 2))
            sizes.append((f"{prefix}.conv3", width, n_out * n_out))
            if block == 0:
                sizes.append((f"{prefix}.downsample", min(c_in, 4 * width), n_out * n_out))
            c_in = 4 * width
        n_in = n_out
    sizes.append(("fc", 1000, 1))
    return sizes


@pytest.mark.slow
def test_resnet50_profile_is_small_and_loads_fast(db_url: str, tmp_path: Path) -> None:
    import time

    sizes = resnet50_spectrum_sizes()
    assert len(sizes) == 54  # 53 convolutions + fc
    rng = np.random.default_rng(0)
    layers = tuple(Layer(name, "Gemm", np.zeros((2, 2)) + index, input_shape=(2,), index=index)
                   for index, (name, _, _) in enumerate(sizes))
    model = LoadedModel(name="resnet50", format="onnx", framework="pytorch", opset=17,
                        layers=layers)
    with Store.open(db_url) as store:
        model_id, layer_ids = store.add_model(model)
        run_id = store.start_run(model_id, {})
        expected = {}
        for layer_id, (name, distinct, mult) in zip(layer_ids, sizes, strict=True):
            values = np.sort(rng.random(distinct))[::-1]
            expected[name] = (values, mult)
            store.add_spectrum(run_id, layer_id, make_spectrum(
                list(values), backend="fft-circulant",
                multiplicities=None if mult == 1 else np.full(distinct, mult)))
        with store.engine.connect() as connection:
            stored = connection.execute(sqlalchemy.text(
                "SELECT SUM(LENGTH(\"values\")) + SUM(COALESCE(LENGTH(multiplicities), 0)) "
                "FROM spectra")).scalar()
        started = time.perf_counter()
        loaded = store.spectra_for_run(run_id)
        seconds = time.perf_counter() - started
    n_values = sum(distinct * mult for _, distinct, mult in sizes)
    distinct_total = sum(distinct for _, distinct, _ in sizes)
    if db_url.startswith("sqlite"):
        stored = Path(db_url.removeprefix("sqlite:///")).stat().st_size
    print(f"\nResNet-50 ({db_url.split(':')[0]}): {distinct_total:,} distinct values "
          f"({n_values:,} with multiplicity), {stored / 1e6:.1f} MB, loaded in {seconds:.2f} s")
    assert [layer["name"] for layer, _ in loaded] == [name for name, _, _ in sizes]
    for layer, spectrum in loaded:
        values, mult = expected[layer["name"]]
        assert np.array_equal(spectrum.values, values) and spectrum.n_values == len(values) * mult
    assert stored < 40e6
    assert seconds < 1.0
