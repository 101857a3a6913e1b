"""The ``spectral`` analyzer on stored runs, and the ``specprof analyze`` command."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import onnx
import pytest
import scipy.linalg
from click.testing import CliRunner
from oracle import conv_matrix

from specprof.engine import hookimpl
from specprof.engine import plugins as plugins_module
from specprof.engine.base import AnalysisContext
from specprof.engine.cli import build_cli
from specprof.engine.errors import SpecprofError
from specprof.engine.loading import load_model
from specprof.engine.plugins import Registry, get_plugin_manager
from specprof.engine.profile import ProfileConfig, profile_model
from specprof.engine.store import Store
from specprof.engine.types import LoadedModel, Spectrum
from specprof.plugins.analyzers import spectral
from specprof.plugins.analyzers.spectral import NO_BASELINE, SpectralAnalyzer
from tests.models import small_cnn

PLUGINS = ("specprof.plugins.importers.onnx_importer", "specprof.plugins.backends.exact",
           "specprof.plugins.backends.toeplitz", "specprof.plugins.analyzers.spectral")
JSON_KEYS = {"layer", "alpha", "alpha_hat", "n_spikes", "mp_ks", "stable_rank", "spectral_norm",
             "lipschitz_bound"}


@dataclass
class Profiled:
    db: str
    run_id: int
    model: LoadedModel
    path: Path


def analyze(store: Store, run_id: int, options: dict[str, Any]) -> Any:
    """The spectral analyzer on one stored run, as a plugin's caller runs it."""
    return SpectralAnalyzer().analyze(AnalysisContext(store=store, options=options), run_id)


@pytest.fixture
def registry() -> Registry:
    return Registry.from_manager(get_plugin_manager(PLUGINS, entry_points=False))


@pytest.fixture
def profiled(tmp_path: Path, registry: Registry, db_url: str) -> Profiled:
    """small_cnn (conv 3->4 @8x8, conv s2 g2 4->4, Gemm 64->5) profiled with the exact backend,
    on SQLite and on PostgreSQL (the ``db_url`` fixture)."""
    path = tmp_path / "small_cnn.onnx"
    onnx.save(small_cnn(), path)
    model = load_model(path, registry=registry)
    db = db_url
    with Store.open(db) as store:
        run_id = profile_model(model, ProfileConfig(backends=("exact",)), store, registry).run_id
    return Profiled(db, run_id, model, path)


def oracle_norms(model: LoadedModel) -> list[float]:
    """Operator norms from the torch oracle's dense matrices (not from any backend)."""
    conv1, conv2, fc = model.layers
    m1 = conv_matrix(np.array(conv1.weight), (3, 8, 8), padding=1)
    m2 = conv_matrix(np.array(conv2.weight), (4, 8, 8), padding=1, stride=2, groups=2)
    return [float(np.linalg.norm(m, 2)) for m in (m1, m2, fc.weight.astype(np.float64))]


def test_rows_norms_and_lipschitz_bound_against_the_oracle(profiled: Profiled,
                                                           registry: Registry) -> None:
    with Store.open(profiled.db) as store:
        frame = analyze(store, profiled.run_id, {})
    assert list(frame["layer"]) == ["conv1", "conv2", "fc"]
    assert set(frame["kind"]) == {"operator"}
    norms = oracle_norms(profiled.model)
    assert np.allclose(frame["spectral_norm"], norms, rtol=1e-5)
    assert np.allclose(frame["lipschitz_bound"], np.cumprod(norms), rtol=1e-5)
    assert frame.attrs["lipschitz_bound"] == pytest.approx(math.prod(norms), rel=1e-5)
    # conv1's operator: 256 x 192 (4 x 8 x 8 outputs, 3 x 8 x 8 inputs): q = 0.75.
    conv1 = frame.iloc[0]
    assert conv1["n_values"] == 192 and conv1["mp_q"] == pytest.approx(0.75)
    assert conv1["alpha"] > 1 and conv1["alpha_hat"] == pytest.approx(
        conv1["alpha"] * math.log10(conv1["lambda_max"]))
    assert conv1["lambda_max"] == pytest.approx(norms[0] ** 2 / 256, rel=1e-5)
    # fc has 5 singular values: no fit, and the reason says so.
    fc = frame.iloc[2]
    assert fc["alpha"] != fc["alpha"] and fc["n_spikes"] is None
    assert "too few values (5) for a power-law fit" in fc["notes"]
    assert frame.attrs["baseline"] == NO_BASELINE
    assert frame[["rand_alpha", "rand_spectral_norm"]].isna().all().all()


def test_results_are_stored_and_rerun_replaces_them(profiled: Profiled,
                                                    registry: Registry) -> None:
    with Store.open(profiled.db) as store:
        first = analyze(store, profiled.run_id, {})
        analyze(store, profiled.run_id, {})
        stored = store.analyses(run=profiled.run_id, analyzer="spectral")
    assert len(stored) == 3
    assert list(stored["layer"]) == list(first["layer"])
    assert np.allclose(stored["spectral_norm"], first["spectral_norm"])
    assert stored["params"].iloc[0] == {"kind": "operator", "backend": "auto"}


def test_shuffled_baseline_with_the_model(profiled: Profiled, registry: Registry) -> None:
    with Store.open(profiled.db) as store:
        frame = analyze(store, profiled.run_id, {"model": profiled.model, "seed": 3})
    assert frame.attrs["baseline"] == "shuffled weights, seed 3"
    # Independent check of conv1's shuffled spectrum: the oracle matrix of the same permutation.
    from specprof.plugins.analyzers.rmt import shuffled

    conv1 = profiled.model.layers[0]
    matrix = conv_matrix(shuffled(conv1.weight, 3 + 0), (3, 8, 8), padding=1)
    assert frame["rand_spectral_norm"].iloc[0] == pytest.approx(np.linalg.norm(matrix, 2), rel=1e-5)
    assert isinstance(frame["rand_n_spikes"].iloc[0], int)
    assert frame["rand_alpha"].iloc[0] > 1
    # fc: 5 values again, so no alpha for the shuffled layer either, but a norm.
    assert frame["rand_alpha"].iloc[2] is None or math.isnan(frame["rand_alpha"].iloc[2])
    assert frame["rand_spectral_norm"].iloc[2] > 0


def _add_filter_spectra(store: Store, run_id: int, model: LoadedModel) -> None:
    """Filter SVDs (DeepDataProfiler: reshape(W, c_out, -1)) by scipy, as a filter backend would."""
    _, layer_ids = store.add_model(model)
    for layer, layer_id in zip(model.layers, layer_ids, strict=True):
        values = scipy.linalg.svdvals(layer.weight.reshape(layer.weight.shape[0], -1).astype(np.float64))
        store.add_spectrum(run_id, layer_id, Spectrum(values=values, kind="filter",
                                                      backend="filter-test", exact=True))


def test_filter_kind_is_chosen_and_its_bound_is_certified(profiled: Profiled,
                                                          registry: Registry) -> None:
    with Store.open(profiled.db) as store:
        _add_filter_spectra(store, profiled.run_id, profiled.model)
        frame = analyze(store, profiled.run_id, {"kind": "filter"})
        default = analyze(store, profiled.run_id, {})
    assert set(frame["kind"]) == {"filter"} and set(default["kind"]) == {"operator"}
    conv1 = profiled.model.layers[0]
    unfolded = scipy.linalg.svdvals(conv1.weight.reshape(4, -1).astype(np.float64))
    assert frame["spectral_norm"].iloc[0] == pytest.approx(unfolded[0])
    # The 4 x 27 unfolded weight has 4 values: no MP fit, and the note says why.
    assert frame["mp_q"].iloc[0] is None or math.isnan(frame["mp_q"].iloc[0])
    assert "too few values (4) for a Marchenko-Pastur fit" in frame["notes"].iloc[0]
    # Conv: 3 x sigma_max(unfolded) (3 = sqrt(3 x 3 taps)) bounds the true operator norm.
    assert frame["layer_bound"].iloc[0] == pytest.approx(3 * unfolded[0])
    norms = oracle_norms(profiled.model)
    assert np.all(frame["layer_bound"].to_numpy() >= np.array(norms) * (1 - 1e-9))
    assert frame["layer_bound"].iloc[2] == pytest.approx(norms[2], rel=1e-5)  # Gemm: exact


def test_approximate_operator_spectra_use_the_certified_upper_bound(
        tmp_path: Path, profiled: Profiled, registry: Registry) -> None:
    with Store.open(profiled.db) as store:
        run_id = profile_model(profiled.model, ProfileConfig(backends=("toeplitz",)), store,
                               registry).run_id
        pairs = store.spectra_for_run(run_id)
        frame = analyze(store, run_id, {})
    expected = {row["name"]: s.sigma_max if s.exact else s.upper_bound for row, s in pairs}
    assert list(frame["layer"]) == ["conv1", "conv2", "fc"]  # every layer, spectrum or not
    for layer, value in zip(frame["layer"], frame["layer_bound"], strict=True):
        bound = expected.get(layer)
        if bound is None:  # no spectrum, or an approximation without a certified bound
            assert value is None or math.isnan(value)
        else:
            assert value == pytest.approx(bound)
    if any(expected.get(layer) is None for layer in frame["layer"]):
        assert frame.attrs["lipschitz_bound"] is None
        assert frame["lipschitz_bound"].isna().iloc[-1]
    else:  # certified: never below the true norms
        assert frame.attrs["lipschitz_bound"] >= math.prod(oracle_norms(profiled.model)) * (1 - 1e-9)


def test_missing_kind_is_a_clear_error(profiled: Profiled, registry: Registry) -> None:
    with Store.open(profiled.db) as store, pytest.raises(SpecprofError) as caught:
        analyze(store, profiled.run_id, {"kind": "filter"})
    assert "has no filter spectra" in caught.value.message and "--spectrum" in caught.value.hint


class _ExactSelection:
    """'auto' picks the exact backend (the built-in selection plugin is not in PLUGINS)."""

    @hookimpl
    def specprof_select_backend(self, layer: Any, request: Any, backends: dict[str, Any]) -> Any:
        return ("exact", "test selection") if "exact" in backends else None


def _cli(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> click.Group:
    if registry.pm.get_plugin("test-selection") is None:
        registry.pm.register(_ExactSelection(), name="test-selection")
    monkeypatch.setattr(plugins_module, "get_registry", lambda: registry)
    return build_cli()


def test_cli_analyze_run_json(profiled: Profiled, registry: Registry,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(_cli(registry, monkeypatch),
                                ["analyze", "--run", str(profiled.run_id), "--db", profiled.db,
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["layer"] for row in rows] == ["conv1", "conv2", "fc"]
    assert all(JSON_KEYS <= set(row) for row in rows)
    assert rows[2]["alpha"] is None and rows[2]["n_spikes"] is None
    assert rows[0]["rand_alpha"] is None  # --run only: no weights, no baseline
    assert isinstance(rows[0]["n_spikes"], int)
    assert rows[2]["lipschitz_bound"] == pytest.approx(math.prod(oracle_norms(profiled.model)),
                                                       rel=1e-5)
    assert "baseline: shuffled baseline needs the weights" in result.stderr


def test_cli_analyze_model_file_finds_its_run_and_adds_the_baseline(
        profiled: Profiled, registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(_cli(registry, monkeypatch),
                                ["analyze", str(profiled.path), "--db", profiled.db,
                                 "--format", "json", "--seed", "1"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 3 and rows[0]["rand_spectral_norm"] > 0
    with Store.open(profiled.db) as store:
        assert len(store.runs()) == 1  # the stored run was found, nothing profiled again
        stored = store.analyses(run=profiled.run_id, analyzer="spectral")
    assert stored["rand_spectral_norm"].iloc[0] == pytest.approx(rows[0]["rand_spectral_norm"])


def test_cli_analyze_model_file_without_a_run_profiles_it(
        tmp_path: Path, profiled: Profiled, registry: Registry,
        monkeypatch: pytest.MonkeyPatch) -> None:
    db = str(tmp_path / "fresh.db")
    result = CliRunner().invoke(_cli(registry, monkeypatch),
                                ["analyze", str(profiled.path), "--db", db, "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert "profiling it now with backend auto" in result.stderr
    assert result.stdout.splitlines()[0].startswith("layer,")
    assert len(result.stdout.strip().splitlines()) == 4


def test_cli_analyze_needs_model_or_run(registry: Registry, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(_cli(registry, monkeypatch),
                                ["analyze", "--db", str(tmp_path / "x.db")])
    assert result.exit_code == 1 and "give either MODEL or --run ID" in result.stderr


def test_plugin_registers_the_analyzer(registry: Registry) -> None:
    assert registry.analyzers["spectral"] is SpectralAnalyzer
    assert spectral.ANALYZER == "spectral"
