"""A seeded fuzzing run of every target in the default suite: every hostile input is accepted
or refused with a ``SpecprofError``, never a traceback; nothing stored is damaged.
``make fuzz`` runs the same targets with many more cases (``python -m tests.fuzz.run``)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from specprof.engine.store import Store
from specprof.testing import small_onnx_model
from tests.fuzz import targets

CASES = 120


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, dict[str, object]]:
    from specprof.engine.loading import load_model
    from specprof.engine.plugins import get_registry
    from specprof.engine.profile import ProfileConfig, profile_model

    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "small.onnx"
    onnx.save(small_onnx_model(), path)
    store = Store.open(str(folder / "fuzz.db"))
    run = profile_model(load_model(path), ProfileConfig(backends=("exact",)), store,
                        get_registry()).run_id
    return store, store.export_run(run)


def test_hostile_onnx_files_never_end_in_a_traceback(tmp_path: Path) -> None:
    outcomes = [targets.load_onnx(tmp_path, seed) for seed in range(CASES)]
    tracebacks = [detail for outcome, detail in outcomes if outcome == "traceback"]
    assert tracebacks == []
    assert sum(outcome == "clean" for outcome, _ in outcomes) > CASES // 4  # it does bite


def test_checkpoint_headers_that_lie_never_end_in_a_traceback(tmp_path: Path) -> None:
    """safetensors and GGUF headers lying about sizes, offsets, shapes, dtypes and counts."""
    bases = targets.checkpoint_bases()
    outcomes = [targets.load_checkpoint(tmp_path, bases, seed) for seed in range(CASES)]
    assert [detail for outcome, detail in outcomes if outcome == "traceback"] == []
    assert sum(outcome == "clean" for outcome, _ in outcomes) > CASES // 2


def test_hostile_exports_never_end_in_a_traceback_nor_change_the_store(
        populated: tuple[Store, dict[str, object]]) -> None:
    store, document = populated
    before = store.counts()
    outcomes = [targets.import_export(store, document, seed) for seed in range(CASES)]
    tracebacks = [detail for outcome, detail in outcomes if outcome == "traceback"]
    assert tracebacks == []
    accepted = sum(outcome == "ok" for outcome, _ in outcomes)
    assert store.counts()["runs"] == before["runs"] + accepted  # refused ones wrote nothing


def test_hostile_queries_never_end_in_a_traceback(
        populated: tuple[Store, dict[str, object]]) -> None:
    store, _ = populated
    before = store.counts()
    outcomes = [targets.query(store, seed) for seed in range(CASES)]
    assert [detail for outcome, detail in outcomes if outcome == "traceback"] == []
    assert store.counts() == before
