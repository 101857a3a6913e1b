"""`specprof compare`: every backend on the same layers, errors against exact, bounds checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from oracle import conv_matrix, singular_values

from specprof.engine.compare import compare_backends
from specprof.engine.plugins import Registry
from specprof.engine.profile import ProfileConfig
from specprof.engine.store import Store
from specprof.engine.types import Layer, LoadedModel

RNG = np.random.default_rng(7)
WEIGHT = RNG.normal(size=(4, 3, 3, 3))


def _model() -> LoadedModel:
    conv = Layer(name="conv", op_type="Conv", weight=WEIGHT, pads=(1, 1, 1, 1),
                 input_shape=(3, 6, 6), index=0)
    fc = Layer(name="fc", op_type="Gemm", weight=RNG.normal(size=(5, 7)), input_shape=(7,),
               index=1)
    return LoadedModel(name="cmp", format="onnx", framework="onnx", opset=18, layers=(conv, fc))


def test_compare_measures_each_backend_against_the_oracle(db_url: str) -> None:
    config = ProfileConfig(backends=("exact", "fft-circulant", "toeplitz"))
    with Store.open(db_url) as store:
        frame = compare_backends(_model(), config, store, Registry.from_manager())
    conv = frame[frame.layer == "conv"].set_index("backend")
    zero_padded = singular_values(conv_matrix(WEIGHT, (3, 6, 6), padding=1))
    circular = singular_values(conv_matrix(WEIGHT, (3, 6, 6), circular=True))
    assert conv.loc["exact", "sigma_max"] == pytest.approx(zero_padded[0], rel=1e-12)
    assert conv.loc["exact", "rel_error"] == 0
    # fft-circulant can't answer the zero-padded question: it is asked the circular one.
    assert conv.loc["fft-circulant", "boundary"] == "circular"
    assert conv.loc["fft-circulant", "sigma_max"] == pytest.approx(circular[0], rel=1e-12)
    expected_error = abs(circular[0] - zero_padded[0]) / zero_padded[0]
    assert conv.loc["fft-circulant", "rel_error"] == pytest.approx(expected_error, rel=1e-9)
    assert bool(conv.loc["toeplitz", "brackets"])
    assert conv.loc["toeplitz", "lower_bound"] <= zero_padded[0] * (1 + 1e-12)
    assert conv.loc["toeplitz", "upper_bound"] >= zero_padded[0] * (1 - 1e-12)
    fc = frame[frame.layer == "fc"].set_index("backend")
    assert fc.loc["toeplitz", "status"] == "skipped"
    assert fc.loc["fft-circulant", "rel_error"] == pytest.approx(0, abs=1e-12)


def test_compare_cli_json(tmp_path: Path) -> None:
    import onnx
    from models import small_cnn

    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), path)
    result = subprocess.run(
        [sys.executable, "-m", "specprof", "compare", str(path), "--db",
         f"sqlite:///{tmp_path}/db.sqlite", "--output-format", "json"],
        capture_output=True, text=True, check=False, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {r["backend"] for r in rows} == {"exact", "fft-circulant", "toeplitz"}
    for row in rows:
        if row["brackets"] is not None:
            assert row["brackets"] is True, row
        if row["backend"] == "exact" and row["status"] == "ok":
            assert row["rel_error"] == 0
