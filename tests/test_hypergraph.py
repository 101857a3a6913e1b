"""The hypergraph analyzer: projection maths, influential sets, metrics, the digits example,
bad input and bounded memory."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from specprof.engine.base import AnalysisContext
from specprof.engine.errors import InputShapeError, SpecprofError
from specprof.engine.plugins import DEFAULT_PLUGINS, Registry, get_plugin_manager
from specprof.engine.store import Store
from specprof.plugins.analyzers import hypergraph as hg
from specprof.plugins.analyzers.activations import ActivationRunner
from specprof.plugins.analyzers.datasets import DataError

HYPERGRAPH_PLUGIN = "specprof.plugins.analyzers.hypergraph"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DIGITS_MODEL = EXAMPLES / "digits_cnn.onnx"
DIGITS_DATA = EXAMPLES / "digits_test.npz"
SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "hypergraph-export.schema.json"


@pytest.fixture(scope="module")
def registry() -> Registry:
    # dict.fromkeys: once the lead lists the plugin in DEFAULT_PLUGINS it must not register twice.
    plugins = tuple(dict.fromkeys((*DEFAULT_PLUGINS, HYPERGRAPH_PLUGIN)))
    pm = get_plugin_manager(default_plugins=plugins, entry_points=False)
    return Registry.from_manager(pm)


# --- a tiny model and an independent NumPy forward pass -----------------------------------------


def _tiny_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x (N, 2, 5, 5) -> Conv 3x3 pad 1 (3 channels, bias) -> Relu -> Flatten -> Gemm (4, bias)."""
    weights = {"w1": rng.standard_normal((3, 2, 3, 3)).astype(np.float32),
               "b1": rng.standard_normal(3).astype(np.float32),
               "w2": rng.standard_normal((4, 75)).astype(np.float32),
               "b2": rng.standard_normal(4).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), weights


def _numpy_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Direct 'same' 3x3 convolution (cross-correlation) with zero padding, by loops."""
    n, _, h, width = x.shape
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, width))
    for i in range(h):
        for j in range(width):
            patch = padded[:, :, i:i + 3, j:j + 3]
            out[:, :, i, j] = np.einsum("nckl,ockl->no", patch, w) + b
    return out


def test_projection_matches_direct_numpy(registry: Registry) -> None:
    rng = np.random.default_rng(1)
    proto, w = _tiny_model(rng)
    from specprof.engine.api import load_model

    loaded = load_model(proto, registry=registry)
    x = rng.standard_normal((6, 2, 5, 5)).astype(np.float32)
    activations = ActivationRunner(loaded.proto, loaded.layers).run(x)
    conv, fc = loaded.layers
    conv_out = _numpy_conv(x, w["w1"], w["b1"])
    fc_out = np.maximum(conv_out, 0).reshape(6, -1) @ w["w2"].T.astype(np.float64) + w["b2"]
    np.testing.assert_allclose(activations[conv.name], conv_out, rtol=1e-4, atol=1e-4)

    u1 = np.linalg.svd(w["w1"].reshape(3, -1).astype(np.float64))[0]
    got = hg.project(hg.channel_first(activations[conv.name], conv), u1, conv.bias)
    want = np.zeros((6, 3, 25))
    for n in range(6):
        for i in range(3):
            for p in range(25):
                want[n, i, p] = u1[:, i] @ (conv_out[n, :, p // 5, p % 5] - w["b1"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # s_i = sigma_i v_i^T x_patch: the projection carries the singular value.
    u1_, s1, vt1 = np.linalg.svd(w["w1"].reshape(3, -1).astype(np.float64), full_matrices=False)
    patch = np.pad(x[0].astype(np.float64), ((0, 0), (1, 1), (1, 1)))[:, 1:4, 2:5].ravel()
    np.testing.assert_allclose(hg.project(hg.channel_first(activations[conv.name], conv), u1_,
                                          conv.bias)[0, :, 1 * 5 + 2], s1 * (vt1 @ patch),
                               rtol=1e-4, atol=1e-4)

    u2 = np.linalg.svd(w["w2"].astype(np.float64))[0]
    got_fc = hg.project(hg.channel_first(activations[fc.name], fc), u2, fc.bias)
    np.testing.assert_allclose(got_fc[:, :, 0], (fc_out - w["b2"]) @ u2, rtol=1e-4, atol=1e-4)


def test_aggregates_by_hand() -> None:
    s = np.array([[[1.0, -3.0, 2.0], [0.5, 0.5, -0.5]]])  # one input, two directions, 3 positions
    np.testing.assert_allclose(hg.aggregate(s, "max"), [[3.0, 0.5]])
    np.testing.assert_allclose(hg.aggregate(s, "mean"), [[2.0, 0.5]])
    np.testing.assert_allclose(hg.aggregate(s, "l2"), [[np.sqrt(14.0), np.sqrt(0.75)]])
    np.testing.assert_allclose(hg.aggregate(s, "signed-mean"), [[0.0, 0.5 / 3]])
    with pytest.raises(SpecprofError, match="aggregate"):
        hg.aggregate(s, "median")


# --- influential sets ---------------------------------------------------------------------------


@pytest.mark.parametrize(("scores", "threshold", "expected"), [
    ([0.2, 0.5, 0.3], 0.1, [1]),            # the top direction alone reaches 10%
    ([0.2, 0.5, 0.3], 0.6, [1, 2]),         # 0.5 < 0.6 <= 0.8
    ([0.2, 0.5, 0.3], 0.8, [1, 2]),         # reaching the threshold exactly is enough
    ([0.2, 0.5, 0.3], 0.81, [0, 1, 2]),
    ([1.0, 0.0, 0.0], 1.0, [0]),            # zero scores never join
    ([0.25, 0.25, 0.25, 0.25], 0.5, [0, 1]),  # ties: lower index first
    ([0.0, 0.0], 0.1, []),                  # nothing to rank
])
def test_influential_sets_by_hand(scores: list[float], threshold: float,
                                  expected: list[int]) -> None:
    mask = hg.influential_directions(np.array([scores]), threshold)
    assert np.flatnonzero(mask[0]).tolist() == expected


def test_influential_rows_are_independent_and_threshold_checked() -> None:
    scores = np.array([[0.9, 0.05, 0.05], [0.1, 0.1, 0.8]])
    assert hg.influential_directions(scores, 0.5).tolist() == [[True, False, False],
                                                                [False, False, True]]
    with pytest.raises(SpecprofError, match="threshold"):
        hg.influential_directions(scores, 0.0)


# --- metrics with known answers -----------------------------------------------------------------


def _counts(masks: np.ndarray, labels: np.ndarray) -> tuple[dict, dict, dict]:
    counts = {int(k): masks[labels == k].sum(axis=0) for k in np.unique(labels)}
    sizes = {int(k): int((labels == k).sum()) for k in np.unique(labels)}
    size_sums = {int(k): int(masks[labels == k].sum()) for k in np.unique(labels)}
    return counts, sizes, size_sums


def test_disjoint_classes_separate_fully() -> None:
    masks = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=bool)
    labels = np.array([0, 0, 1, 1])
    counts, sizes, size_sums = _counts(masks, labels)
    edges = hg.class_edges(counts, sizes, 0.5)
    assert edges == {0: frozenset({0, 1}), 1: frozenset({2, 3})}
    assert hg.separation(edges) == (1.0, 0.0, 0.0, 0.0)
    assert hg.n_components(edges) == 2
    # Two disconnected, equal cliques: modularity 1/2.
    assert hg.class_modularity(counts, size_sums) == pytest.approx(0.5)


def test_identical_classes_do_not_separate() -> None:
    masks = np.ones((4, 3), dtype=bool)
    labels = np.array([0, 0, 1, 1])
    counts, sizes, size_sums = _counts(masks, labels)
    edges = hg.class_edges(counts, sizes, 0.5)
    assert hg.separation(edges) == (0.0, 1.0, 1.0, 1.0)
    assert hg.n_components(edges) == 1
    assert hg.class_modularity(counts, size_sums) < 0.01


def test_partial_overlap_jaccard_and_components() -> None:
    edges = {0: frozenset({0, 1, 2}), 1: frozenset({2, 3}), 2: frozenset({5}), 3: frozenset()}
    matrix = hg.jaccard_matrix(edges)
    assert matrix.loc[0, 1] == pytest.approx(1 / 4)
    assert matrix.loc[3, 3] == 1.0 and matrix.loc[2, 3] == 0.0
    sep, mean, low, high = hg.separation(edges)
    assert mean == pytest.approx(0.25 / 6) and sep == pytest.approx(1 - 0.25 / 6)
    assert (low, high) == (0.0, 0.25)
    assert hg.n_components(edges) == 3  # {0, 1} share direction 2; {2}; the empty class


def test_modularity_matches_networkx_on_the_clique_expansion() -> None:
    import networkx as nx

    rng = np.random.default_rng(3)
    masks = rng.random((30, 8)) < 0.3
    labels = rng.integers(0, 3, 30)
    counts, _sizes, size_sums = _counts(masks, labels)
    graph = nx.Graph()
    graph.add_nodes_from(range(30))
    for i in range(30):
        for j in range(i + 1, 30):
            shared = int((masks[i] & masks[j]).sum())
            if shared:
                graph.add_edge(i, j, weight=shared)
    classes = [set(np.flatnonzero(labels == k).tolist()) for k in range(3)]
    expected = nx.community.modularity(graph, classes, weight="weight")
    assert hg.class_modularity(counts, size_sums) == pytest.approx(expected, abs=1e-12)


# --- the digits example -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> hg.HypergraphResult:
    db = str(tmp_path_factory.mktemp("hg") / "hg.db")
    return hg.run_hypergraph(str(DIGITS_MODEL), str(DIGITS_DATA), db=db, registry=registry,
                             quiet=True)


def _shuffled_copy(path: Path, target: Path) -> Path:
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.ndim >= 2:  # weights, not biases or shapes
            shuffled = rng.permutation(array.ravel()).reshape(array.shape)
            tensor.CopyFrom(numpy_helper.from_array(shuffled, tensor.name))
    onnx.save(model, str(target))
    return target


def test_digits_separation_grows_with_depth(digits: hg.HypergraphResult) -> None:
    frame = digits.metrics
    assert list(frame["depth"]) == [1, 2, 3, 4, 5]
    assert frame["n_inputs"].eq(360).all() and frame["n_classes"].eq(10).all()
    first, last = frame["separation"].iloc[0], frame["separation"].iloc[-1]
    assert last > first + 0.3, frame[["layer", "separation"]]
    assert frame["modularity"].iloc[-1] > frame["modularity"].iloc[0]


def test_shuffled_weights_separate_less(digits: hg.HypergraphResult, registry: Registry,
                                        tmp_path: Path) -> None:
    shuffled = _shuffled_copy(DIGITS_MODEL, tmp_path / "shuffled.onnx")
    _graphs, frame = hg.hypergraph(str(shuffled), str(DIGITS_DATA), db=str(tmp_path / "s.db"),
                                   registry=registry, quiet=True)
    assert frame["separation"].iloc[-1] < digits.metrics["separation"].iloc[-1] - 0.3


def test_hypergraphs_returned(digits: hg.HypergraphResult) -> None:
    graph = digits.hypergraphs[digits.metrics["layer"].iloc[-1]]
    classes = hg.class_hypergraph(graph)
    assert sum(1 for e in graph.edges if str(e).startswith("input:")) <= 360
    assert 0 < len(list(classes.edges)) <= 10
    edges, _edge_props, node_props = digits.incidences[digits.metrics["layer"].iloc[-1]]
    assert len(node_props) == 10 and "class:0" in edges


def test_stored_filter_run_is_reused(registry: Registry, db_url: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    db = db_url  # on SQLite and on PostgreSQL
    first = hg.run_hypergraph(str(DIGITS_MODEL), str(DIGITS_DATA), db=db, registry=registry,
                              layers="*Gemm")
    assert "no stored filter spectra" in capsys.readouterr().err
    second = hg.run_hypergraph(str(DIGITS_MODEL), str(DIGITS_DATA), db=db, registry=registry,
                               layers="*Gemm")
    assert "no stored filter spectra" not in capsys.readouterr().err
    assert first.run_id == second.run_id
    with Store.open(db) as store:
        stored = store.analyses(run=first.run_id, analyzer="hypergraph")
        assert len(stored) == 2  # the re-run replaced the rows of the same parameters
        np.testing.assert_allclose(stored["separation"], second.metrics["separation"])
        names = list(store.hypergraphs(run=first.run_id, analyzer="hypergraph")["name"])
        assert sorted(names) == sorted(second.metrics["layer"])  # replaced, not duplicated


def test_cli_json_and_export(registry: Registry, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    import click
    import jsonschema

    from specprof.engine import plugins as plugins_module
    from specprof.engine.cli_common import SpecprofGroup

    @click.group(cls=SpecprofGroup)
    def cli() -> None:
        """Test CLI."""

    registry.pm.hook.specprof_register_commands(cli=cli)
    monkeypatch.setattr(plugins_module, "get_registry", lambda: registry)
    export = tmp_path / "hg.json"
    result = CliRunner().invoke(cli, ["hypergraph", str(DIGITS_MODEL), "--data", str(DIGITS_DATA),
                                      "--db", str(tmp_path / "cli.db"), "--format", "json",
                                      "--layers", "*features.0*,*classifier.2*", "-q",
                                      "--export", str(export)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["depth"] for row in rows] == [1, 5]
    for key in ("layer", "depth", "separation", "mean_jaccard", "n_components", "modularity"):
        assert key in rows[0]
    document = json.loads(export.read_text())
    jsonschema.validate(document, json.loads(SCHEMA.read_text()))
    assert document["layers"][1]["metrics"]["separation"] == rows[1]["separation"]
    assert sum(e["kind"] == "input" for e in document["layers"][0]["edges"]) == 360


# --- bad input ----------------------------------------------------------------------------------


def test_data_of_the_wrong_shape_names_the_expected_one(registry: Registry, tmp_path: Path) -> None:
    path = tmp_path / "wrong.npz"
    np.savez(path, x=np.zeros((4, 1, 7, 7), np.float32), y=np.arange(4))
    with pytest.raises(InputShapeError, match=r"expects \(1, 8, 8\)") as caught:
        hg.hypergraph(str(DIGITS_MODEL), str(path), db=str(tmp_path / "db.db"), registry=registry,
                      quiet=True)
    assert "\n" not in caught.value.one_line()


def test_missing_labels_are_reported(registry: Registry, tmp_path: Path) -> None:
    path = tmp_path / "nolabels.npz"
    np.savez(path, x=np.zeros((4, 1, 8, 8), np.float32))
    db = str(tmp_path / "db.db")
    with pytest.raises(DataError, match="labels missing"):
        hg.hypergraph(str(DIGITS_MODEL), str(path), db=db, registry=registry, quiet=True)
    with pytest.raises(DataError, match="labels missing"):
        hg.hypergraph(str(DIGITS_MODEL), np.zeros((4, 1, 8, 8), np.float32), db=db,
                      registry=registry, quiet=True)
    with pytest.raises(DataError, match="labels missing"):
        hg.hypergraph(str(DIGITS_MODEL), [np.zeros((1, 8, 8), np.float32)] * 3, db=db,
                      registry=registry, quiet=True)


def test_image_folder_of_the_wrong_size(registry: Registry, tmp_path: Path) -> None:
    from PIL import Image

    for label in ("0", "1"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "imgs" / label / "a.png")
    with pytest.raises(InputShapeError, match="expects 8x8"):
        hg.hypergraph(str(DIGITS_MODEL), str(tmp_path / "imgs"), db=str(tmp_path / "db.db"),
                      registry=registry, quiet=True)


def test_image_folder_and_iterable_give_the_npz_answer(registry: Registry, tmp_path: Path,
                                                       digits: hg.HypergraphResult) -> None:
    from PIL import Image

    with np.load(DIGITS_DATA) as arrays:
        x, y = arrays["x"][:40], arrays["y"][:40]
    for k, (image, label) in enumerate(zip(x, y, strict=True)):
        folder = tmp_path / "imgs" / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image[0] * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{k}.png")
    db = str(tmp_path / "db.db")
    quantized = np.round(x * 255) / 255
    _g, from_pairs = hg.hypergraph(str(DIGITS_MODEL), list(zip(quantized, y, strict=True)), db=db,
                                   registry=registry, quiet=True, batch_size=7)
    _g, from_folder = hg.hypergraph(str(DIGITS_MODEL), str(tmp_path / "imgs"), db=db,
                                    registry=registry, quiet=True, batch_size=16)
    np.testing.assert_allclose(from_pairs["separation"], from_folder["separation"])
    np.testing.assert_allclose(from_pairs["modularity"], from_folder["modularity"])


def test_streaming_keeps_memory_bounded(registry: Registry, tmp_path: Path) -> None:
    """Peak traced memory for 2N inputs stays near that for N (one batch at a time)."""
    from specprof.engine.api import load_model

    loaded = load_model(str(DIGITS_MODEL), registry=registry)
    db = str(tmp_path / "mem.db")
    with Store.open(db) as store:
        run_id = hg.ensure_filter_run(store, loaded, loaded.layers, registry, lambda _t: None)

        def stream(n: int):
            rng = np.random.default_rng(0)
            for start in range(0, n, 100):
                yield (rng.random((100, 1, 8, 8), dtype=np.float32),
                       np.arange(start, start + 100) % 10)

        # A first pass pays for one-time allocations (lazy imports, caches); then N and 2N.
        peaks = []
        for n in (300, 1500, 3000):
            tracemalloc.start()
            hg.analyze_run(store, run_id, loaded, stream(n), batch_size=100,
                           options=hg.HypergraphOptions(input_edges=False))
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
    assert peaks[2] < 1.3 * peaks[1], peaks


def test_layer_globs_that_match_nothing(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(SpecprofError, match="no layer matches"):
        hg.hypergraph(str(DIGITS_MODEL), str(DIGITS_DATA), db=str(tmp_path / "db.db"),
                      registry=registry, layers="nope*", quiet=True)


def test_analyzer_plugin_on_a_stored_run(registry: Registry, tmp_path: Path) -> None:
    from specprof.engine.api import load_model

    assert registry.analyzers["hypergraph"] is hg.HypergraphAnalyzer
    loaded = load_model(str(DIGITS_MODEL), registry=registry)
    with Store.open(str(tmp_path / "a.db")) as store:
        run_id = hg.ensure_filter_run(store, loaded, loaded.layers, registry, lambda _t: None)
        options = {"model": str(DIGITS_MODEL), "data": str(DIGITS_DATA), "layers": "*Gemm",
                   "threshold": 0.3}
        frame = hg.HypergraphAnalyzer().analyze(AnalysisContext(store, options), run_id)
        assert list(frame["depth"]) == [4, 5]
        stored = store.analyses(run=run_id, analyzer="hypergraph")
        assert stored["params"].iloc[0]["threshold"] == 0.3
        with pytest.raises(SpecprofError, match="needs the model"):
            hg.HypergraphAnalyzer().analyze(
                AnalysisContext(store, {"data": str(DIGITS_DATA)}), run_id)
