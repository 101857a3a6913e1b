"""The normalized-model cache (``specprof.engine.normalize.NormalizeCache``) as ``load_model``
uses it, and the certified bracket the profile table and the report show per layer."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from oracle import conv_matrix, singular_values

from specprof.engine import api
from specprof.engine.cli import build_cli
from specprof.engine.loading import load_model
from specprof.engine.normalize import CACHE_DIR_ENV, CACHE_ENV, NormalizeCache
from specprof.plugins.analyzers.report import bracket_text, with_brackets
from specprof.plugins.importers.onnx_importer import OnnxImporter
from tests.models import seeded, single_op, small_cnn


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_DIR_ENV, str(folder))
    monkeypatch.delenv(CACHE_ENV, raising=False)
    return folder


def _entries(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "normalized").glob("*.onnxn"))


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def _hashes(loaded) -> list[str]:
    return [layer.content_hash for layer in loaded.layers]


def _uncached(path: Path, monkeypatch: pytest.MonkeyPatch, **options):
    with monkeypatch.context() as patch:
        patch.setenv(CACHE_ENV, "0")
        return load_model(path, **options)


def _refuse_import_and_normalize(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("imported or normalized again on a cache hit")

    monkeypatch.setattr(OnnxImporter, "load", refuse)
    monkeypatch.setattr("specprof.engine.loading.normalize", refuse)


def test_second_load_reads_the_cache_and_gives_the_same_layers(tmp_path, cache_dir, monkeypatch):
    path = _save(small_cnn(), tmp_path / "cnn.onnx")
    first = load_model(path)
    assert len(_entries(cache_dir)) == 1
    reference = _uncached(path, monkeypatch)
    with monkeypatch.context() as patch:
        _refuse_import_and_normalize(patch)
        second = load_model(path)
    assert _hashes(first) == _hashes(second) == _hashes(reference)
    assert [layer.input_shape for layer in second.layers] == \
        [layer.input_shape for layer in reference.layers]
    assert second.opset == reference.opset and second.warnings == reference.warnings
    assert second.proto is not None and second.name == "cnn"


def test_changed_content_is_a_miss(tmp_path, cache_dir, monkeypatch):
    path = tmp_path / "layer.onnx"
    _save(single_op("Conv", seeded((4, 3, 3, 3), 1), [1, 3, 8, 8], pads=[1, 1, 1, 1]), path)
    load_model(path)
    _save(single_op("Conv", seeded((4, 3, 3, 3), 2), [1, 3, 8, 8], pads=[1, 1, 1, 1]), path)
    again = load_model(path)
    assert len(_entries(cache_dir)) == 2
    np.testing.assert_array_equal(again.layers[0].weight, seeded((4, 3, 3, 3), 2))
    assert _hashes(again) == _hashes(_uncached(path, monkeypatch))


def test_changed_import_options_are_a_miss(tmp_path, cache_dir, monkeypatch):
    path = _save(single_op("Conv", seeded((4, 3, 3, 3), 1), ["N", 3, "H", "W"],
                           pads=[1, 1, 1, 1]), tmp_path / "dynamic.onnx")
    small = load_model(path, input_shape="3,8,8")
    large = load_model(path, input_shape="3,16,16")
    assert len(_entries(cache_dir)) == 2
    assert small.layers[0].input_shape == (3, 8, 8) and large.layers[0].input_shape == (3, 16, 16)
    with monkeypatch.context() as patch:
        _refuse_import_and_normalize(patch)  # both are hits now
        assert load_model(path, input_shape="3,16,16").layers[0].input_shape == (3, 16, 16)
        assert load_model(path, input_shape="3,8,8").layers[0].input_shape == (3, 8, 8)
    # Folding is extraction, after the cache: the same entry serves both.
    folded = load_model(path, input_shape="3,8,8", fold_batchnorm=True)
    assert len(_entries(cache_dir)) == 2
    assert _hashes(folded) == _hashes(_uncached(path, monkeypatch, input_shape="3,8,8",
                                                 fold_batchnorm=True))


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_entry_is_ignored_and_rebuilt(tmp_path, cache_dir, monkeypatch, damage):
    path = _save(small_cnn(), tmp_path / "cnn.onnx")
    reference = load_model(path)
    (entry,) = _entries(cache_dir)
    data = entry.read_bytes()
    damaged = {"truncate": data[:len(data) // 2],
               "flip": data[:-20] + bytes(b ^ 0xFF for b in data[-20:]),
               "garbage": b"not a cache entry at all",
               "empty": b""}[damage]
    entry.write_bytes(damaged)
    again = load_model(path)
    assert _hashes(again) == _hashes(reference)
    assert entry.read_bytes() == data  # written again, whole
    with monkeypatch.context() as patch:
        _refuse_import_and_normalize(patch)
        assert _hashes(load_model(path)) == _hashes(reference)


def test_environment_variable_turns_the_cache_off(tmp_path, cache_dir, monkeypatch):
    path = _save(small_cnn(), tmp_path / "cnn.onnx")
    monkeypatch.setenv(CACHE_ENV, "off")
    calls: list[Path] = []
    load = OnnxImporter.load

    def counting(self, source, options):
        calls.append(source)
        return load(self, source, options)

    monkeypatch.setattr(OnnxImporter, "load", counting)
    load_model(path)
    load_model(path)
    assert len(calls) == 2
    assert not cache_dir.exists()


def test_warnings_of_normalization_come_back_from_the_cache(tmp_path, cache_dir, monkeypatch):
    path = _save(small_cnn(opset=13), tmp_path / "old.onnx")

    def refuse(model, target):
        raise RuntimeError("no adapter for this op")

    with monkeypatch.context() as patch:
        patch.setattr("specprof.engine.normalize.version_converter.convert_version", refuse)
        first = load_model(path)
    assert any("kept opset 13" in w for w in first.warnings)
    with monkeypatch.context() as patch:
        _refuse_import_and_normalize(patch)
        second = load_model(path)
    assert second.warnings == first.warnings and second.opset == 13


def test_model_with_external_data_is_not_cached(tmp_path, cache_dir):
    path = tmp_path / "external.onnx"
    onnx.save_model(small_cnn(), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    size_threshold=0, location="external.data")
    first = load_model(path)
    assert _entries(cache_dir) == []
    # Its weights live in the data file, which the model file's hash does not cover.
    model = onnx.load(path)
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(
        2 * onnx.numpy_helper.to_array(model.graph.initializer[0]),
        model.graph.initializer[0].name))
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    size_threshold=0, location="external.data")
    assert _hashes(load_model(path)) != _hashes(first)


def test_unwritable_cache_folder_still_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(CACHE_DIR_ENV, str(blocker))
    monkeypatch.delenv(CACHE_ENV, raising=False)
    path = _save(small_cnn(), tmp_path / "cnn.onnx")
    assert _hashes(load_model(path)) == _hashes(_uncached(path, monkeypatch))


def test_concurrent_processes_share_one_entry(tmp_path, cache_dir):
    path = _save(small_cnn(), tmp_path / "cnn.onnx")
    script = ("import sys; from specprof.engine.loading import load_model; "
              "print(','.join(l.content_hash for l in load_model(sys.argv[1]).layers))")
    runs = [subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE,
                             text=True) for _ in range(3)]
    outputs = {run.communicate()[0].strip() for run in runs}
    assert all(run.returncode == 0 for run in runs)
    assert len(outputs) == 1
    assert len(_entries(cache_dir)) == 1
    assert not list((cache_dir / "normalized").glob(".partial-*"))  # no temporary left
    cache = NormalizeCache(cache_dir / "normalized")
    key = _entries(cache_dir)[0].stem
    assert cache.get(key) is not None


def test_prune_removes_least_recently_used_beyond_the_budget(tmp_path):
    cache = NormalizeCache(tmp_path / "normalized", max_bytes=1)
    model = small_cnn()
    assert cache.put("a" * 64, model, [])
    assert cache.put("b" * 64, model, ["w"])
    assert cache.get("a" * 64) is None  # over budget: the older entry went
    found = cache.get("b" * 64)
    assert found is not None and found.warnings == ("w",)


# --- the certified bracket per layer ----------------------------------------------------------

def _toeplitz_model(tmp_path: Path) -> tuple[Path, np.ndarray]:
    weight = seeded((4, 3, 3, 3), 7)
    path = _save(single_op("Conv", weight, [1, 3, 10, 10], pads=[1, 1, 1, 1]),
                 tmp_path / "conv.onnx")
    return path, weight


def test_sigma_max_error_holds_the_true_norm(tmp_path, cache_dir):
    path, weight = _toeplitz_model(tmp_path)
    frame = api.profile(path, backend="toeplitz", db=str(tmp_path / "s.db"))
    row = frame.iloc[0]
    truth = singular_values(conv_matrix(weight.astype(np.float64), (3, 10, 10), padding=1))[0]
    assert row.lower_bound <= truth * (1 + 1e-12) and truth <= row.upper_bound * (1 + 1e-12)
    assert 0 < row.sigma_max_error < 1
    assert abs(row.sigma_max - truth) <= row.sigma_max_error * row.sigma_max * (1 + 1e-9)
    exact = api.profile(path, backend="fft-circulant", boundary="circular",
                        db=str(tmp_path / "s.db"))
    assert np.isnan(exact.iloc[0].sigma_max_error)  # no bracket: nothing to say


def test_profile_table_shows_the_bracket_column(tmp_path, cache_dir):
    path, _ = _toeplitz_model(tmp_path)
    result = CliRunner().invoke(build_cli(), ["profile", str(path), "--backend", "toeplitz",
                                              "--db", str(tmp_path / "t.db"), "-q"],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "±" in result.output
    assert re.search(r"\d(\.\d+)?%", result.output)  # the per-layer percentage
    assert "--backend exact" in result.output
    listed = CliRunner().invoke(build_cli(), ["profile", str(path), "--backend", "toeplitz",
                                              "--db", str(tmp_path / "t.db"), "--output-format",
                                              "json"])
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.output)
    assert row["sigma_max_error"] > 0


def test_report_bracket_text_and_rows():
    import pandas as pd

    assert bracket_text(2.0, 1.9, 2.1) == "[1.9, 2.1] ±5%"
    assert bracket_text(2.0, float("nan"), float("nan")) == ""
    assert bracket_text(2.0, 2.0, 2.0) == "[2, 2] ±<0.01%"
    rows = pd.DataFrame({"spectrum_id": [1, 2, np.nan]})
    spectra = pd.DataFrame({"spectrum_id": [1, 2], "sigma_max": [2.0, 3.0],
                            "lower_bound": [1.5, np.nan], "upper_bound": [2.5, np.nan]})
    assert list(with_brackets(rows, spectra)["spectral_norm_bracket"]) == \
        ["[1.5, 2.5] ±25%", "", ""]


# --- fft-circulant's top-k of a matrix layer (ResNet-50's fc: 2.5 s of full SVD before) ----

@pytest.mark.parametrize("shape", [(40, 90), (90, 40)])
@pytest.mark.parametrize("k", [1, 3])
def test_matrix_top_k_matches_the_full_svd(shape, k):
    from specprof.engine.types import Layer, Request
    from specprof.plugins.backends.fft_circulant import FftCirculantBackend

    weight = seeded(shape, 11)
    layer = Layer(name="fc", op_type="Gemm", weight=weight, input_shape=(shape[1],),
                  output_shape=(shape[0],))
    spectrum = FftCirculantBackend().compute(layer, Request(boundary="circular", top_k=k))
    truth = np.linalg.svd(weight.astype(np.float64), compute_uv=False)[:k]
    np.testing.assert_allclose(spectrum.values, truth, rtol=1e-12)
    assert "top-" in spectrum.note and not spectrum.complete


def test_report_shows_the_bracket_of_toeplitz_layers(tmp_path, cache_dir):
    from specprof.engine.base import AnalysisContext
    from specprof.engine.plugins import get_registry
    from specprof.engine.profile import ProfileConfig, profile_model
    from specprof.engine.store import Store
    from specprof.plugins.analyzers.report import build_report
    from specprof.plugins.analyzers.spectral import SpectralAnalyzer

    path, _ = _toeplitz_model(tmp_path)
    model = load_model(path)
    with Store.open(str(tmp_path / "r.db")) as store:
        run_id = profile_model(model, ProfileConfig(backends=("toeplitz",)), store,
                               get_registry()).run_id
        SpectralAnalyzer().analyze(AnalysisContext(store=store, options={"model": model}), run_id)
        text = build_report(store, run_id)
        stored = store.query(run=run_id).iloc[0]
    assert "spectral_norm_bracket" in text
    expected = bracket_text(stored.sigma_max, stored.lower_bound, stored.upper_bound)
    assert expected.startswith("[") and expected in text
