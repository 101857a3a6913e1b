"""The database commands (query, runs, delete, export, import) and the store's failure modes,
run on a SQLite file and on PostgreSQL (``db_url``), plus the 0001 -> head schema upgrade."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy
from click.testing import CliRunner, Result

from specprof.engine import cli_store
from specprof.engine.cli_common import SpecprofGroup
from specprof.engine.errors import StoreError
from specprof.engine.store import Store, head_revision, parse_where
from tests.test_store import fill_old_database, make_model, make_spectrum


def invoke(*args: str, input: str | None = None) -> Result:
    group = SpecprofGroup("specprof")
    for store_command in cli_store.COMMANDS:
        group.add_command(store_command)
    return CliRunner().invoke(group, list(args), input=input, catch_exceptions=False)


def fill(db_url: str) -> tuple[int, int]:
    """Two complete runs of two models: (run of 'resnet-a', run of 'vgg')."""
    with Store.open(db_url) as store:
        run_ids = []
        for name, seed, top in (("resnet-a", 0, 5.0), ("vgg", 1, 2.0)):
            model_id, layer_ids = store.add_model(make_model(name, seed))
            run_id = store.start_run(model_id, {"backends": ["exact"]})
            store.add_spectrum(run_id, layer_ids[0], make_spectrum([top, 1.0, 0.5]))
            store.add_spectrum(run_id, layer_ids[1], make_spectrum(
                [top / 2, 0.25], multiplicities=np.array([2, 3]),
                left_vectors=np.eye(3, dtype=np.float32)))
            store.add_analysis(run_id, "spectral", {"bins": 5}, [
                {"layer_id": layer_ids[1], "spectrum_id": None, "metrics": {"alpha": seed + 2.0}}])
            store.add_hypergraph(run_id, "hypergraph", "h", {}, {"e": ["a", "b"]})
            store.finish_run(run_id, "complete")
            run_ids.append(run_id)
    return run_ids[0], run_ids[1]


# --- query -------------------------------------------------------------------------------------


def test_query_where_sort_limit(db_url: str) -> None:
    fill(db_url)
    out = invoke("query", "--db", db_url, "--where", "sigma_max > 2.4 and n_values >= 3",
                 "--format", "json")
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert sorted((row["model"], row["layer"]) for row in rows) == [
        ("resnet-a", "conv1"), ("resnet-a", "fc")]
    out = invoke("query", "--db", db_url, "--sort", "-sigma_max", "--limit", "2", "--format", "json")
    assert [row["sigma_max"] for row in json.loads(out.output)] == [5.0, 2.5]
    out = invoke("query", "--db", db_url, "--model", "VGG", "--layer", "f?", "--format", "csv")
    frame = pd.read_csv(__import__("io").StringIO(out.output))
    assert frame[["model", "layer", "sigma_max"]].values.tolist() == [["vgg", "fc", 1.0]]


@pytest.mark.parametrize("where", ["sigma_max > 3; DROP TABLE spectra", "name = 'x'",
                                   "sigma_max > 3 or 1 = 1", "sigma_max >", "1 > sigma_max"])
def test_where_rejects_anything_but_column_op_number(where: str) -> None:
    with pytest.raises(StoreError) as refused:
        parse_where(where)
    assert "\n" not in refused.value.one_line() and refused.value.hint


def test_bad_where_is_one_line_and_tables_survive(db_url: str) -> None:
    fill(db_url)
    out = invoke("query", "--db", db_url, "--where", "sigma_max > 3; DROP TABLE spectra")
    assert out.exit_code == 1 and out.output.count("\n") == 1 and "--where" in out.output
    with Store.open(db_url) as store:
        assert store.counts()["spectra"] == 4


def test_query_writes_parquet_csv_json_files(db_url: str, tmp_path: Path) -> None:
    fill(db_url)
    for name in ("out.parquet", "out.csv", "out.json"):
        target = tmp_path / name
        out = invoke("query", "--db", db_url, "--values", "-o", str(target))
        assert out.exit_code == 0, out.output
        assert target.stat().st_size > 0
    frame = pd.read_parquet(tmp_path / "out.parquet")
    assert len(frame) == 4
    fc = frame[(frame["model"] == "vgg") & (frame["layer"] == "fc")].iloc[0]
    assert list(fc["singular_values"]) == [1.0, 1.0, 0.25, 0.25, 0.25]
    assert len(json.loads((tmp_path / "out.json").read_text())) == 4
    out = invoke("query", "--db", db_url, "--format", "parquet")
    assert out.exit_code == 1 and "-o" in out.output


# --- runs, delete ------------------------------------------------------------------------------


def test_runs_lists_status_and_marks_dead_writers(db_url: str) -> None:
    fill(db_url)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    with Store.open(db_url) as store:
        model_id, _ = store.add_model(make_model("resnet-a", 0))
        stale = store.start_run(model_id, {})
        with store.engine.begin() as connection:  # as if a process that is gone had started it
            connection.execute(sqlalchemy.text("UPDATE runs SET pid = :pid WHERE id = :id"),
                               {"pid": dead_pid, "id": stale})
    out = invoke("runs", "--db", db_url, "--format", "json")
    rows = json.loads(out.output)
    assert [row["status"] for row in rows] == ["interrupted", "complete", "complete"]
    assert rows[0]["id"] == stale and [row["n_spectra"] for row in rows] == [0, 2, 2]


def test_delete_run_asks_then_deletes_in_one_go(db_url: str) -> None:
    run_a, run_b = fill(db_url)
    out = invoke("delete", "--db", db_url, "--run", str(run_a), input="n\n")
    assert out.exit_code == 1  # aborted
    with Store.open(db_url) as store:
        assert store.counts()["spectra"] == 4
    out = invoke("delete", "--db", db_url, "--run", str(run_a), "--yes")
    assert out.exit_code == 0 and "deleted 1 run(s) and 2 layer result(s)" in out.output
    with Store.open(db_url) as store:
        assert store.runs()["id"].tolist() == [run_b]
        assert store.counts() == {"models": 2, "layers": 4, "runs": 1, "spectra": 2}
        assert store.analyses()["run"].tolist() == [run_b]
        assert store.hypergraphs()["run"].tolist() == [run_b]
    out = invoke("delete", "--db", db_url, "--model", "vgg", "--yes")
    assert out.exit_code == 0
    with Store.open(db_url) as store:
        assert store.counts() == {"models": 1, "layers": 2, "runs": 0, "spectra": 0}
    out = invoke("delete", "--db", db_url, "--run", "999", "--yes")
    assert out.exit_code == 1 and "no run 999" in out.output


# --- export and import -------------------------------------------------------------------------


def test_run_moves_from_sqlite_to_postgres_and_back(tmp_path: Path, postgres_url: str) -> None:
    sqlite_url = f"sqlite:///{tmp_path}/a.db"
    run_a, _ = fill(sqlite_url)
    exported = tmp_path / "run.json"
    assert invoke("export", "--db", sqlite_url, "--run", str(run_a), "-o", str(exported)).exit_code == 0
    out = invoke("import", "--db", postgres_url, str(exported))
    assert out.exit_code == 0, out.output
    with Store.open(sqlite_url) as source, Store.open(postgres_url) as target:
        new_run = target.latest_run()
        assert new_run is not None
        before, after = source.spectra_for_run(run_a), target.spectra_for_run(new_run)
        assert [layer["layer_hash"] for layer, _ in before] == [row["layer_hash"] for row, _ in after]
        for (_, old), (_, new) in zip(before, after, strict=True):
            assert np.array_equal(old.expanded(), new.expanded())
            assert (old.left_vectors is None) == (new.left_vectors is None)
            if old.left_vectors is not None:
                assert new.left_vectors.dtype == np.float32
                assert np.array_equal(old.left_vectors, new.left_vectors)
        assert target.analyses()["alpha"].tolist() == [2.0]
        graph = target.load_hypergraph(int(target.hypergraphs()["hypergraph_id"].iloc[0]))
        assert graph["incidence"] == {"e": ["a", "b"]}
        # And back again: the model exists there (same hash), so only a run is added.
        document = target.export_run(new_run)
    second = Store.open(sqlite_url)
    with second:
        again = second.import_run(document)
        assert second.counts()["models"] == 2 and second.counts()["runs"] == 3
        assert second.query(run=again)["sigma_max"].tolist() == [5.0, 2.5]


def test_invalid_export_is_refused_whole(db_url: str, tmp_path: Path) -> None:
    run_a, _ = fill(db_url)
    with Store.open(db_url) as store:
        document = store.export_run(run_a)
        counts = store.counts()
    broken = json.loads(json.dumps(document))
    broken["results"][1]["values"] = 12  # not base64 text
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(broken))
    out = invoke("import", "--db", db_url, str(path))
    assert out.exit_code == 1 and out.output.count("\n") == 1
    assert "results/1/values" in out.output
    dangling = json.loads(json.dumps(document))
    dangling["results"][1]["layer_index"] = 7
    with Store.open(db_url) as store, pytest.raises(StoreError, match="no layer with index 7"):
        store.import_run(dangling)
    path.write_text("{not json")
    assert invoke("import", "--db", db_url, str(path)).exit_code == 1
    with Store.open(db_url) as store:
        assert store.counts() == counts


# --- schema upgrade and bad databases ----------------------------------------------------------


def test_upgrade_from_0001_keeps_the_data(db_url: str) -> None:
    fill_old_database(db_url, "0001", 1)
    with pytest.raises(StoreError, match="older"):
        Store.open(db_url)
    assert Store.upgrade_url(db_url) == ("0001", head_revision())
    with Store.open(db_url) as store:
        assert store.load_spectrum(1).values.tolist() == [3.0, 1.0]
        assert store.run_info(1)["pid"] is None
        with store.engine.connect() as connection:
            row = connection.execute(sqlalchemy.text(
                "SELECT l.model, l.layer, r.n_ok FROM layer_summary l JOIN run_summary r USING (run_id)"
                )).one()
        assert tuple(row) == ("old", "fc", 1)
        store.add_analysis(1, "spectral", {}, [{"layer_id": 1, "metrics": {"a": 1}}])


def test_read_only_sqlite_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    fill(str(path))
    with Store.open(str(path)) as store:
        counts = store.counts()
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"
    with Store.open(read_only) as store:
        assert store.counts() == counts  # reading works
        model_id, _ = store.add_model(make_model("resnet-a", 0))  # exists: no write needed
        with pytest.raises(StoreError) as refused:
            store.start_run(model_id, {})
    assert "readonly" in refused.value.one_line().replace("-", "").replace(" ", "")
    assert "\n" not in refused.value.one_line()
    with Store.open(str(path)) as store:
        assert store.counts() == counts


def test_connection_killed_mid_run_leaves_no_half_rows(postgres_url: str) -> None:
    """PostgreSQL drops the writer's connection inside a transaction (pg_terminate_backend):
    one-line error, nothing of that transaction stored, the run marked failed afterwards."""
    from sqlalchemy import event

    from specprof.engine.types import LoadedModel

    big = make_model("big", 3, layer_names=tuple(f"conv{i}" for i in range(6)))
    with Store.open(postgres_url) as store:
        killer = sqlalchemy.create_engine(postgres_url)

        @event.listens_for(store.engine, "before_cursor_execute")
        def _terminate(connection, cursor, statement, *_args):  # type: ignore[no-untyped-def]
            if statement.startswith("INSERT INTO layers"):
                pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
                with killer.begin() as other:
                    other.execute(sqlalchemy.text("SELECT pg_terminate_backend(:pid)"),
                                  {"pid": pid})

        with pytest.raises(StoreError) as refused:
            store.add_model(big)
        event.remove(store.engine, "before_cursor_execute", _terminate)
        killer.dispose()
        assert "\n" not in refused.value.one_line()
        assert store.counts() == {"models": 0, "layers": 0, "runs": 0, "spectra": 0}
        assert isinstance(big, LoadedModel)
        model_id, layer_ids = store.add_model(big)  # the pool reconnects: the store goes on
        assert len(layer_ids) == 6 and model_id


@pytest.mark.postgres
@pytest.mark.parametrize(("url", "expected"), [
    ("postgresql://nobody:secret@127.0.0.1:5432/test", 'role "nobody" does not exist'),
    ("postgresql://postgres@127.0.0.1:5432/no_such_db", 'database "no_such_db" does not exist'),
])
def test_wrong_credentials_or_database_are_one_line_with_the_password_masked(
        postgres_server: str, url: str, expected: str) -> None:
    result = subprocess.run([sys.executable, "-m", "specprof", "query", "--db", url],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert expected in result.stderr and "secret" not in result.stderr
