"""Property-based fuzzing with hypothesis: strategies that build hostile conv attributes and
declared shapes, checkpoint headers, export documents and query parameters from scratch (the
seeded mutators of ``targets`` damage valid files; these explore values no valid file has).
Derandomized, so a run is reproducible and a failure is shrunk to its smallest example."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from specprof.engine.errors import SpecprofError
from specprof.engine.store import Store
from specprof.testing import small_onnx_model
from tests.fuzz import targets

FUZZ = settings(max_examples=60, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

hostile_ints = st.one_of(st.integers(-3, 9), st.sampled_from([2**31 - 1, 2**32, 2**40, 2**63 - 1]))
hostile_json: st.SearchStrategy[Any] = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8)),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.text(max_size=5), children, max_size=3)),
    max_leaves=12)


@st.composite
def conv_models(draw: st.DrawFn) -> onnx.ModelProto:
    """A Conv whose attributes, weight shape and declared input are drawn from hostile values."""
    weight_shape = draw(st.lists(st.integers(1, 4), min_size=3, max_size=5))
    attributes = {name: draw(st.lists(hostile_ints, min_size=1, max_size=4))
                  for name in ("strides", "dilations", "pads", "kernel_shape")
                  if draw(st.booleans())}
    if draw(st.booleans()):
        attributes["group"] = draw(hostile_ints)
    dims = [1, *draw(st.lists(hostile_ints, min_size=1, max_size=4))]
    weight = numpy_helper.from_array(np.ones(weight_shape, np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attributes)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@given(conv_models())
@FUZZ
def test_hostile_conv_attributes_and_shapes_load_and_plan_cleanly(model: onnx.ModelProto) -> None:
    """Loading is accepted or one SpecprofError; an accepted layer is planned (memory and time
    estimates, backend choice) without computing or allocating for it."""
    from specprof.engine.loading import load_model
    from specprof.engine.plugins import get_registry
    from specprof.engine.profile import ProfileConfig, choose_backend

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "conv.onnx")
        onnx.save(model, path)
        try:
            loaded = load_model(path)
        except SpecprofError as error:
            assert "\n" not in error.one_line()
            return
    config = ProfileConfig(max_memory=2**30)
    for layer in loaded.layers:
        choose_backend(layer, config.request(layer), "auto", get_registry())


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    """A safetensors file whose header entries say anything at all about the data after it."""
    entry = st.fixed_dictionaries({
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "F8_E4M3", "X", ""]),
        "shape": st.lists(hostile_ints, max_size=3),
        "data_offsets": st.lists(hostile_ints, min_size=2, max_size=2)})
    header = draw(st.dictionaries(st.text(min_size=1, max_size=6),
                                  st.one_of(entry, hostile_json), min_size=1, max_size=3))
    text = json.dumps(header).encode()
    data = draw(st.binary(max_size=128))
    return struct.pack("<Q", len(text)) + text + data


@given(safetensors_files())
@FUZZ
def test_safetensors_headers_that_lie_are_refused_in_one_line(data: bytes) -> None:
    from specprof.engine.loading import load_model

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "model.safetensors")
        path.write_bytes(data)
        try:
            for layer in load_model(path).layers:
                assert np.isfinite(layer.weight.size)
        except SpecprofError as error:
            assert "\n" not in error.one_line()


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, dict[str, Any]]:
    from specprof.engine.loading import load_model
    from specprof.engine.plugins import get_registry
    from specprof.engine.profile import ProfileConfig, profile_model

    folder = tmp_path_factory.mktemp("strategies")
    onnx.save(small_onnx_model(), folder / "small.onnx")
    store = Store.open(str(folder / "fuzz.db"))
    run = profile_model(load_model(folder / "small.onnx"), ProfileConfig(backends=("exact",)),
                        store, get_registry()).run_id
    return store, store.export_run(run)


@st.composite
def damaged_exports(draw: st.DrawFn, document: dict[str, Any]) -> dict[str, Any]:
    """An export with drawn hostile JSON at one to three drawn places."""
    hostile = json.loads(json.dumps(document))
    for _ in range(draw(st.integers(1, 3))):
        node: Any = hostile
        while isinstance(node, dict | list) and node and draw(st.booleans()):
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            key = draw(st.sampled_from(keys))
            if not isinstance(node[key], dict | list) or not node[key]:
                node[key] = draw(hostile_json)
                break
            node = node[key]
        else:
            if isinstance(node, dict):
                node[draw(st.text(max_size=6))] = draw(hostile_json)
    return hostile


def test_drawn_hostile_exports_are_refused_whole(populated: tuple[Store, dict[str, Any]]) -> None:
    store, document = populated

    @given(damaged_exports(document))
    @FUZZ
    def check(hostile: dict[str, Any]) -> None:
        before = store.counts()["runs"]
        outcome, detail = targets.classify(lambda: store.import_run(hostile))
        assert outcome != "traceback", detail
        assert store.counts()["runs"] == before + (outcome == "ok")

    check()


def test_drawn_query_parameters_never_break_the_store(
        populated: tuple[Store, dict[str, Any]]) -> None:
    store, _ = populated
    words = st.sampled_from(["sigma_max", "layer", ">", "=", "and", "or", "'", ";", "--",
                             "DROP TABLE runs", "(", ")", "1e999", "\x00", "%", "_"])

    @given(where=st.one_of(st.text(max_size=20), st.lists(words, max_size=6).map(" ".join)),
           sort=st.one_of(st.none(), st.text(max_size=10)),
           model=st.one_of(st.none(), st.text(max_size=6)),
           limit=st.one_of(st.none(), st.integers(-2**70, 2**70)))
    @FUZZ
    def check(where: str, sort: str | None, model: str | None, limit: int | None) -> None:
        before = store.counts()
        outcome, detail = targets.classify(
            lambda: store.query(where=where, sort=sort, model=model, limit=limit))
        assert outcome != "traceback", detail
        assert store.counts() == before

    check()
