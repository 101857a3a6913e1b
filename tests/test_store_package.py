"""The store package's parts: the JSON cleaner, ``Store.find_run``, the spectrum identity hash,
partial spectra, guarded export reading and all-or-nothing import, ids no row can have, and
the package's own layout (public re-exports, no private names across its modules)."""

from __future__ import annotations

import ast
import hashlib
import json
import math
import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from specprof.engine.db_models import HypergraphRow
from specprof.engine.errors import StoreError
from specprof.engine.jsonable import jsonable
from specprof.engine.store import (
    Store,
    exchange,
    json_clean,
    params_hash,
    parse_export,
    read_export,
    spectrum_params_hash,
)
from specprof.engine.types import Request
from tests.test_store import make_model, make_spectrum

STORE_PACKAGE = Path(__file__).resolve().parents[1] / "engine" / "store"


@pytest.fixture
def store(db_url: str) -> Any:
    with Store.open(db_url) as opened:
        yield opened


# --- jsonable ----------------------------------------------------------------------------------


def test_jsonable_makes_plain_json_data() -> None:
    value = {
        "nan": float("nan"), "inf": np.float32("inf"), "np_int": np.int64(3),
        "np_bool": np.bool_(True), "array": np.arange(3), "nested": [(1, np.float64(0.5))],
        "na": pd.NA, "nat": pd.NaT, "when": datetime(2024, 1, 2, 3, 4, tzinfo=UTC),
        "day": date(2024, 1, 2), "stamp": pd.Timestamp("2024-01-02T03:04:05"),
        "path": Path("/x/model.onnx"), "blob": b"\x00\x01", "set": {3, 1, 2},
        "series": pd.Series([1.0, None]), 7: "int key", "str": np.str_("s"),
    }
    clean = jsonable(value)
    assert clean == {
        "nan": None, "inf": None, "np_int": 3, "np_bool": True, "array": [0, 1, 2],
        "nested": [[1, 0.5]], "na": None, "nat": None, "when": "2024-01-02T03:04:00+00:00",
        "day": "2024-01-02", "stamp": "2024-01-02T03:04:05", "path": "/x/model.onnx",
        "blob": "AAE=", "set": [1, 2, 3], "series": [1.0, None], "7": "int key", "str": "s",
    }
    assert type(clean["np_int"]) is int and type(clean["str"]) is str
    json.dumps(clean, allow_nan=False)  # strict JSON: no NaN left anywhere
    assert json_clean is jsonable  # the store's former name still works


def test_jsonable_bind_only_converts_numpy_scalars() -> None:
    blob, when = b"\x00\xff", datetime(2024, 1, 1)
    params = ({"id": np.int64(4), "blob": blob, "when": when, "nan": float("nan")},
              [np.float64(1.5), (np.int32(2), "x")])
    bound = jsonable(params, bind=True)
    assert isinstance(bound, tuple) and isinstance(bound[1][1], tuple)
    assert type(bound[0]["id"]) is int and bound[0]["blob"] is blob and bound[0]["when"] is when
    assert math.isnan(bound[0]["nan"]) and bound[1] == [1.5, (2, "x")]


def test_jsonable_imports_neither_numpy_nor_pandas() -> None:
    code = ("import sys; from specprof.engine.jsonable import jsonable; "
            "jsonable({'a': [1.0, float('nan')], 'b': object()}); "
            "print(sorted(m for m in ('numpy', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- find_run ----------------------------------------------------------------------------------


def _run(store: Store, name: str, seed: int, backend: str = "exact", kind: str = "operator",
         status: str = "complete") -> int:
    model_id, layer_ids = store.add_model(make_model(name, seed))
    run_id = store.start_run(model_id, {})
    store.add_spectrum(run_id, layer_ids[0], make_spectrum([2.0, 1.0], backend, kind))
    if status != "running":
        store.finish_run(run_id, status)
    return run_id


def test_find_run_by_id_name_glob_status_and_results(store: Store) -> None:
    exact = _run(store, "resnet_a", 0)
    filters = _run(store, "resnet_a", 0, "filter", "filter")
    other = _run(store, "vgg", 1)
    failed = _run(store, "vgg", 1, status="failed")
    assert store.find_run(run=exact) == exact  # given: only checked to exist
    assert store.find_run(run=np.int64(failed)) == failed
    assert store.find_run() == other  # newest complete run
    assert store.find_run(status=None) == failed
    assert store.find_run(model="resnet_a") == filters
    assert store.find_run(model="RESNET?A") == filters
    assert store.find_run(model="resnet*", kind="operator") == exact
    assert store.find_run(model="resnet*", backend="filter") == filters
    model_id, _ = store.add_model(make_model("renamed", 1))  # vgg's content, another name
    assert store.find_run(model_id=model_id) == other
    with pytest.raises(StoreError) as none:
        store.find_run(model="resnet*", backend="exact", kind="filter")
    line = none.value.one_line()
    assert "no complete run of a model named 'resnet*' with filter spectra from backend " \
        "'exact'" in line and "specprof runs" in line and "\n" not in line
    with pytest.raises(StoreError, match="no complete run of a model named 'nothing'"):
        store.find_run(model="nothing")


@pytest.mark.parametrize("run", [999, -1, 2**63, 2**64, 10**30])
def test_find_run_of_a_missing_id_is_one_line(store: Store, run: int) -> None:
    _run(store, "net", 0)
    with pytest.raises(StoreError) as missing:
        store.find_run(run=run)
    assert missing.value.message.startswith(f"no run {run} in ")
    assert "specprof runs" in missing.value.hint


def test_ids_no_row_can_have_are_missing_not_overflowing(store: Store) -> None:
    run_id = _run(store, "net", 0)
    huge = 2**64
    for call in (lambda: store.run_info(huge), lambda: store.load_spectrum(huge),
                 lambda: store.export_run(-5), lambda: store.delete(run=huge),
                 lambda: store.finish_run(huge, "failed"), lambda: store.reopen_run(huge),
                 lambda: store.load_hypergraph(huge),
                 lambda: store.add_analysis(huge, "a", {}, []),
                 lambda: store.add_spectrum(huge, 1, make_spectrum([1.0]))):
        with pytest.raises(StoreError, match=r"^no (run|spectrum|hypergraph|layer) "):
            call()
    assert store.query(run=huge).empty and store.spectra_for_run(huge) == []
    assert store.run_results(huge) == {} and store.analyses(run=huge).empty
    assert store.hypergraphs(run=huge).empty and store.layers(huge).empty
    assert store.run_info(run_id)["status"] == "complete"


# --- the spectrum identity ---------------------------------------------------------------------


def test_backend_parameters_do_not_split_the_dedupe_identity(store: Store) -> None:
    model = make_model()
    model_id, (conv_id, _) = store.add_model(model)
    run_id = store.start_run(model_id, {})
    request = Request(boundary="zeros").params()
    stored = make_spectrum([4.0, 1.0])
    stored = type(stored)(values=stored.values, kind="operator", backend="exact", exact=True,
                          params={**request, "method": "lanczos", "tol": 1e-9})
    store.add_spectrum(run_id, conv_id, stored)
    found = store.find_spectrum(model.layers[0].content_hash, "exact", request)
    assert found is not None and found.params["method"] == "lanczos"  # extras stay on record
    # The request's own parameters still tell results apart.
    assert store.find_spectrum(model.layers[0].content_hash, "exact",
                               {**request, "top_k": 5}) is None
    assert store.find_spectrum(model.layers[0].content_hash, "exact",
                               {**request, "precision": "float32"}) is None
    assert spectrum_params_hash({**request, "method": "x"}) == params_hash(request)
    assert set(Request.IDENTITY) == set(request)
    # Hashes of plain parameters are what they always were (stored rows stay findable).
    plain = {"boundary": "zeros", "top_k": None, "precision": "float64"}
    assert params_hash(plain) == hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()


# --- partial spectra ---------------------------------------------------------------------------


def test_partial_spectrum_stores_unknowns_as_null_and_round_trips(store: Store) -> None:
    model_id, (conv_id, fc_id) = store.add_model(make_model())
    run_id = store.start_run(model_id, {})
    partial = store.add_spectrum(run_id, conv_id, make_spectrum([5.0, 3.0], complete=False))
    whole = store.add_spectrum(run_id, fc_id, make_spectrum([4.0, 2.0]))
    store.finish_run(run_id, "complete")
    frame = store.query().set_index("spectrum_id")
    assert frame.loc[partial, "complete"] == False  # noqa: E712 (a pandas boolean)
    assert math.isnan(frame.loc[partial, "sigma_min"]) and math.isnan(frame.loc[partial, "stable_rank"])
    assert frame.loc[partial, "sigma_max"] == 5.0
    assert frame.loc[whole, "complete"] == True and frame.loc[whole, "sigma_min"] == 2.0  # noqa: E712
    loaded = store.load_spectrum(partial)
    assert not loaded.complete and math.isnan(loaded.sigma_min)
    assert store.load_spectrum(whole).complete

    document = store.export_run(run_id)
    assert document["version"] == exchange.EXPORT_VERSION
    assert [item["complete"] for item in document["results"]] == [False, True]
    again = store.import_run(document)
    back = {layer["name"]: spectrum for layer, spectrum in store.spectra_for_run(again)}
    assert not back["conv1"].complete and back["fc"].complete
    assert store.query(run=again)["sigma_min"].isna().tolist() == [True, False]


def test_version_1_export_without_complete_still_imports(store: Store) -> None:
    model_id, (conv_id, _) = store.add_model(make_model())
    run_id = store.start_run(model_id, {})
    store.add_spectrum(run_id, conv_id, make_spectrum([5.0, 3.0]))
    old = store.export_run(run_id)
    old["version"] = 1
    for item in old["results"]:
        del item["complete"]
    again = store.import_run(old)
    assert [spectrum.complete for _, spectrum in store.spectra_for_run(again)] == [True]


# --- reading export files ----------------------------------------------------------------------


def _exported(store: Store) -> tuple[int, dict[str, Any]]:
    model_id, layer_ids = store.add_model(make_model())
    run_id = store.start_run(model_id, {"backends": ["exact"]})
    for layer_id in layer_ids:
        store.add_spectrum(run_id, layer_id, make_spectrum([3.0, 1.0]))
    store.add_analysis(run_id, "spectral", {}, [{"layer_id": layer_ids[0], "metrics": {"a": 1}}])
    store.add_hypergraph(run_id, "hypergraph", "h", {}, {"e": ["a"]})
    store.finish_run(run_id, "complete")
    return run_id, store.export_run(run_id)


def test_import_file_round_trip(store: Store, tmp_path: Path) -> None:
    _, document = _exported(store)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(document))
    again = store.import_file(path)
    assert store.run_info(again)["status"] == "complete"
    assert len(store.spectra_for_run(again)) == 2


def test_read_export_refuses_a_file_over_the_size_limit(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"pad": "x" * 200}))
    monkeypatch.setattr(exchange, "MAX_EXPORT_BYTES", 100)
    with pytest.raises(StoreError, match="larger than 100 bytes") as failure:
        read_export(path)
    assert "\n" not in failure.value.one_line()


def test_read_export_refuses_deep_nesting_without_recursion_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    for depth in (100, 200_000):  # above the limit; far above Python's recursion limit
        path.write_text('{"a": ' + "[" * depth + "]" * depth + "}")
        with pytest.raises(StoreError, match="deeper than 64 levels"):
            read_export(path)
    path.write_text('{"a": ' + "[" * 60 + "]" * 60 + "}")  # deep, but within the limit
    assert read_export(path)["a"] == _nested(59)
    with pytest.raises(StoreError, match="deeper than 64 levels at b/0/0"):
        exchange.validate_export({"b": _nested(70)})


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def test_read_export_names_bad_utf8_not_json_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(b'{"name": "caf\xe9"}')
    with pytest.raises(StoreError, match=r"not UTF-8 text \(byte 13"):
        read_export(path)
    path.write_bytes(b"{not json")
    with pytest.raises(StoreError, match="is not JSON"):
        read_export(path)
    path.write_bytes(b"[1, 2]")
    with pytest.raises(StoreError, match="not an object"):
        read_export(path)
    with pytest.raises(StoreError, match=r"cannot read .*missing\.json"):
        read_export(tmp_path / "missing.json")
    # A byte-order mark is fine; NaN and Infinity (which Python's json writes) are read as null.
    assert parse_export(b'\xef\xbb\xbf{"a": NaN, "b": -Infinity}') == {"a": None, "b": None}


def test_invalid_documents_write_nothing(store: Store) -> None:
    _, document = _exported(store)
    counts = store.counts()
    broken: list[tuple[str, Any, str]] = [
        ("results/0/created_at", "yesterday", "results/0/created_at"),
        ("results/0/values", "QUJD", "not a whole number of float64"),
        ("results/1/multiplicities", "AAAAAAAAAAA=", "not one int64 per value"),
        ("results/0/n_values", 2**70, "does not fit a 64-bit integer"),
        ("results/0/complete", "yes", "results/0/complete"),
        ("version", 3, "version"),
    ]
    for where, value, message in broken:
        bad = json.loads(json.dumps(document))
        target = bad
        *parents, last = where.split("/")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[last] = value
        with pytest.raises(StoreError, match=message) as failure:
            store.import_run(bad)
        assert failure.value.message.startswith("not a valid specprof run export at")
    assert store.counts() == counts


def test_import_is_one_transaction(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    _, document = _exported(store)
    document["model"]["sha256"] = "c" * 64  # a model new to the database, so it is written too
    counts = store.counts()

    class BrokenHypergraph:
        __table__ = HypergraphRow.__table__  # planning reads the columns, writing fails

        def __init__(self, **_fields: Any) -> None:
            raise StoreError("disk full while writing the hypergraphs")

    # The model, layers, run, results and analyses are written before the hypergraphs fail.
    monkeypatch.setattr(exchange, "HypergraphRow", BrokenHypergraph)
    with pytest.raises(StoreError, match="disk full"):
        store.import_run(document)
    assert store.counts() == counts
    assert store.analyses().shape[0] == 1  # only the original run's


# --- the package's layout ----------------------------------------------------------------------


def test_no_module_imports_another_modules_private_names() -> None:
    modules = {path.stem for path in STORE_PACKAGE.glob("*.py")}
    for path in [*STORE_PACKAGE.glob("*.py"), STORE_PACKAGE.parent / "jsonable.py"]:
        tree = ast.parse(path.read_text())
        siblings = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("specprof."):
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"
                siblings |= {alias.asname or alias.name for alias in node.names
                             if alias.name in modules}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in siblings:
                assert not node.attr.startswith("_"), f"{path.name} uses {node.value.id}.{node.attr}"


def test_the_package_exports_what_other_modules_import() -> None:
    import specprof.engine.store as store_package

    for name in ("Store", "load_spectrum", "resolve_url", "default_db_path", "alembic_config",
                 "head_revision", "parse_where", "glob_to_like", "QUERY_COLUMNS", "WHERE_COLUMNS",
                 "SORT_COLUMNS", "VERSION_TABLE", "json_clean", "params_hash", "encode_array",
                 "decode_array", "export_schema", "validate_export", "read_export", "StoreError"):
        assert hasattr(store_package, name), name
    assert set(store_package.__all__) <= set(dir(store_package))
