"""All singular values of weight matrices (engine/dense.py) against numpy's float64 SVD."""

from __future__ import annotations

import numpy as np
import pytest

from specprof.engine.dense import gram_singular_values, matrix_singular_values

PROMISE = {"float32": 1e-5, "float64": 1e-10}


def oracle(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(300, 300), (700, 120), (50, 400), (1, 9), (9, 1), (2, 2)])
def test_values_keep_the_precision_promise(shape: tuple[int, int], precision: str) -> None:
    matrix = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    values, how = matrix_singular_values(matrix, precision)  # type: ignore[arg-type]
    expected = oracle(matrix)
    assert values.shape == expected.shape
    assert np.all(np.diff(values) <= 0)
    assert np.max(np.abs(values - expected)) <= PROMISE[precision] * expected[0], how


def test_float32_takes_the_gram_and_beats_float32_lapack() -> None:
    matrix = np.random.default_rng(0).standard_normal((600, 600)).astype(np.float32)
    values, how = matrix_singular_values(matrix, "float32")
    assert "Gram" in how
    expected = oracle(matrix)
    lapack32 = np.linalg.svd(matrix, compute_uv=False).astype(np.float64)
    assert np.max(np.abs(values - expected)) < np.max(np.abs(lapack32 - expected))


def test_rank_deficient_float64_falls_back_to_the_svd() -> None:
    """Repeated columns: zero singular values, whose Gram error estimate is sqrt(Delta)."""
    base = np.random.default_rng(1).standard_normal((400, 60))
    matrix = np.concatenate([base, base], axis=1)  # 400 x 120, rank 60
    values, how = matrix_singular_values(matrix, "float64")
    assert how == "float64 SVD"
    assert np.max(np.abs(values - oracle(matrix))) <= 1e-10 * values[0]
    _, error = gram_singular_values(matrix)
    assert error > 1e-10 * values[0]  # why: the Gram could not promise 1e-10 here


def test_zero_and_empty_matrices() -> None:
    values, _ = matrix_singular_values(np.zeros((5, 3), dtype=np.float32), "float32")
    assert np.array_equal(values, np.zeros(3))
    assert matrix_singular_values(np.zeros((0, 4)), "float64")[0].size == 0


def test_the_gram_never_copies_a_whole_matrix() -> None:
    """A read-only memory map (as safetensors gives) is read slice by slice, untouched."""
    matrix = np.random.default_rng(2).standard_normal((3000, 40)).astype(np.float32)
    matrix.setflags(write=False)
    values, error = gram_singular_values(matrix)
    assert np.max(np.abs(values - oracle(matrix))) <= max(error, 1e-12 * values[0])
