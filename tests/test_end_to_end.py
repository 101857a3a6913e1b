"""From a model file to stored spectra and back out of `query`, on SQLite and PostgreSQL,
checked against the torch oracle; and bad input that must leave the database as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracle import conv_matrix, singular_values

import specprof
from specprof.engine.store import Store
from specprof.schemas import load_schema

RNG = np.random.default_rng(42)
CONV_W = RNG.normal(size=(3, 2, 3, 3))
FC_W = RNG.normal(size=(4, 27))  # Gemm weight with transB=1: (out, in)


def _onnx_model(weights_as: str) -> onnx.ModelProto:
    """Conv 3x3 pad 1 (2->3 channels on 5x5, stride 2 -> 3x3) -> Flatten -> Gemm(transB)."""
    conv = helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1],
                            strides=[2, 2])
    flat = helper.make_node("Flatten", ["c"], ["f"], name="flatten")
    gemm = helper.make_node("Gemm", ["f", "F"], ["y"], name="fc", transB=1)
    tensors = [numpy_helper.from_array(CONV_W.astype(np.float32), "W"),
               numpy_helper.from_array(FC_W.astype(np.float32), "F")]
    nodes = [conv, flat, gemm]
    initializers = tensors
    if weights_as == "constant":
        consts = [helper.make_node("Constant", [], [t.name], value=t) for t in tensors]
        nodes, initializers = consts + nodes, []
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _truth() -> dict[str, np.ndarray]:
    w = CONV_W.astype(np.float32).astype(np.float64)
    fc = FC_W.astype(np.float32).astype(np.float64)
    return {"conv": singular_values(conv_matrix(w, (2, 5, 5), stride=2, padding=1)),
            "fc": singular_values(fc)}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "specprof", *args], capture_output=True,
                          text=True, check=False, env={**os.environ, **(env or {})})


def _check_values(records: list[dict], truth: dict[str, np.ndarray]) -> None:
    by_layer = {r["layer"]: r for r in records if r["backend"] == "exact"}
    assert set(by_layer) == set(truth)
    for layer, expected in truth.items():
        values = np.array(by_layer[layer]["singular_values"])
        assert values.shape == expected.shape
        np.testing.assert_allclose(values, expected, rtol=1e-10, atol=1e-12)
        assert by_layer[layer]["sigma_max"] == pytest.approx(expected[0], rel=1e-12)
        assert by_layer[layer]["n_values"] == expected.size


@pytest.mark.parametrize("weights_as", ["initializer", "constant"])
def test_onnx_file_through_cli_profile_and_query(tmp_path: Path, db_url: str,
                                                 weights_as: str) -> None:
    path = tmp_path / "tiny.onnx"
    onnx.save(_onnx_model(weights_as), path)
    profiled = _cli("profile", str(path), "--db", db_url, "--backend", "exact,filter",
                    "--output-format", "json")
    assert profiled.returncode == 0, profiled.stderr
    rows = json.loads(profiled.stdout)
    assert {(r["layer"], r["backend"], r["status"]) for r in rows} == {
        ("conv", "exact", "ok"), ("fc", "exact", "ok"), ("conv", "filter", "ok"),
        ("fc", "filter", "ok")}
    queried = _cli("query", "--db", db_url, "--model", "tin*", "--values", "--format", "json")
    assert queried.returncode == 0, queried.stderr
    records = json.loads(queried.stdout)
    jsonschema.validate(records, load_schema("query-results"))
    _check_values(records, _truth())
    filters = {r["layer"]: r for r in records if r["backend"] == "filter"}
    assert filters["conv"]["kind"] == "filter" and filters["conv"]["n_values"] == 3
    np.testing.assert_allclose(filters["conv"]["singular_values"],
                               np.linalg.svd(CONV_W.astype(np.float32).reshape(3, -1),
                                             compute_uv=False), rtol=1e-6)


def test_initializer_and_constant_weights_give_the_same_numbers(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/db.sqlite"
    frames = []
    for weights_as in ("initializer", "constant"):
        path = tmp_path / f"{weights_as}.onnx"
        onnx.save(_onnx_model(weights_as), path)
        frames.append(specprof.profile(path, backend="exact", db=db, force=True))
    assert frames[0].sigma_max.tolist() == frames[1].sigma_max.tolist()
    stored = specprof.query(db=db, backend="exact", values=True)
    assert len(stored) == 4
    # Ids straight from the DataFrame (numpy integers) load the same values.
    values = specprof.load_spectrum(stored.spectrum_id.iloc[0], db=db)
    assert values.tolist() == stored.singular_values.iloc[0]
    assert len(values) == stored.n_values.iloc[0]


def test_torch_module_through_the_python_api(db_url: str) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1, stride=2),
                                 torch.nn.Flatten(), torch.nn.Linear(27, 4, bias=False)).eval()
    frame = specprof.profile(module, backend="exact", db=db_url, input_shape=(2, 5, 5),
                             name="torchnet")
    assert frame.status.tolist() == ["ok", "ok"]
    stored = specprof.query(db=db_url, model="torchnet", values=True)
    conv_w = module[0].weight.detach().double().numpy()
    fc_w = module[2].weight.detach().double().numpy()
    expected = [singular_values(conv_matrix(conv_w, (2, 5, 5), stride=2, padding=1)),
                singular_values(fc_w)]
    stored = stored.sort_values("layer_index")
    for values, truth in zip(stored.singular_values, expected, strict=True):
        np.testing.assert_allclose(values, truth, rtol=1e-6)  # float32 weights in the export


# ---------------------------------------------------------------- bad input

def _counts(db: str) -> dict[str, int]:
    with Store.open(db) as store:
        return store.counts()


@pytest.fixture
def populated(tmp_path: Path) -> str:
    """A database holding one complete run, to show failures write nothing."""
    db = f"sqlite:///{tmp_path}/existing.db"
    path = tmp_path / "tiny.onnx"
    onnx.save(_onnx_model("initializer"), path)
    specprof.profile(path, backend="exact", db=db)
    return db


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = _onnx_model("initializer").SerializeToString()
    files = {"text.onnx": b"this is not a model\n", "truncated.onnx": good[: len(good) // 2],
             "model.xyz": b"\x00\x01 unknown binary content", "weights.pt": b"PK\x03\x04 not really a torch file"}
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(content)
    return paths


@pytest.mark.parametrize(("name", "message"), [
    ("text.onnx", "not a valid ONNX"),
    ("truncated.onnx", "not a valid ONNX"),
    ("model.xyz", "--format"),
])
def test_bad_model_files_give_one_line_and_write_nothing(tmp_path: Path, populated: str,
                                                         name: str, message: str) -> None:
    before = _counts(populated)
    result = _cli("profile", str(_bad_files(tmp_path)[name]), "--db", populated)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert message in result.stderr
    assert _counts(populated) == before


def test_missing_torch_extra_names_the_extra(tmp_path: Path, populated: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    # A sitecustomize that makes torch unimportable, as on a machine without the extra.
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    before = _counts(populated)
    path = _bad_files(tmp_path)["weights.pt"]
    result = _cli("profile", str(path), "--db", populated, "--input-shape", "3,8,8",
                  env={"PYTHONPATH": str(blocker)})
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "pip install 'specprof[torch]'" in result.stderr
    assert _counts(populated) == before


def test_unreachable_database_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "tiny.onnx"
    onnx.save(_onnx_model("initializer"), path)
    result = _cli("profile", str(path), "--db", "postgresql://postgres@127.0.0.1:1/test")
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "127.0.0.1:1" in result.stderr


def test_input_shape_the_model_cannot_take(tmp_path: Path, populated: str) -> None:
    path = tmp_path / "tiny.onnx"
    onnx.save(_onnx_model("initializer"), path)
    before = _counts(populated)
    result = _cli("profile", str(path), "--db", populated, "--input-shape", "5,5,5")
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "input" in result.stderr.lower()
    assert _counts(populated) == before


def test_unknown_backend_is_refused_before_anything_is_stored(tmp_path: Path,
                                                              populated: str) -> None:
    path = tmp_path / "tiny.onnx"
    onnx.save(_onnx_model("initializer"), path)
    before = _counts(populated)
    result = _cli("profile", str(path), "--db", populated, "--backend", "nope")
    assert result.returncode != 0 and "unknown backend 'nope'" in result.stderr
    assert _counts(populated) == before
