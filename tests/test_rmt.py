"""The random-matrix math of the spectral analyzer, against laws with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg

from specprof.plugins.analyzers import rmt


def gaussian(n_rows: int, n_cols: int, seed: int) -> np.ndarray:
    """An n_rows x n_cols matrix of i.i.d. N(0, 1/n_rows) entries: MP with s2 = 1/n_rows."""
    return np.random.default_rng(seed).standard_normal((n_rows, n_cols)) / math.sqrt(n_rows)


def test_mp_cdf_matches_quadrature_of_the_density() -> None:
    q, s2 = 0.3, 2.0
    a, b = rmt.mp_edges(q, s2)
    points = np.linspace(a, b, 7)[1:-1]
    expected = [scipy.integrate.quad(lambda x: rmt.mp_pdf(np.array([x]), q, s2)[0], a, p,
                                     limit=200)[0] for p in points]
    assert np.allclose(rmt.mp_cdf(points, q, s2), expected, atol=1e-5)
    total = scipy.integrate.quad(lambda x: rmt.mp_pdf(np.array([x]), q, s2)[0], a, b, limit=200)[0]
    assert total == pytest.approx(1.0, abs=1e-6)


def test_gaussian_matrix_fits_mp_without_spikes() -> None:
    n_rows, n_cols = 1000, 500
    sigma = scipy.linalg.svdvals(gaussian(n_rows, n_cols, seed=0))
    fit = rmt.fit_marchenko_pastur(rmt.esd(sigma, n_rows), n_rows, n_cols)
    assert fit.n_spikes == 0
    assert fit.q == pytest.approx(0.5)
    assert fit.s2 == pytest.approx(1 / n_rows, rel=0.02)  # the entries' true variance
    assert fit.ks is not None and fit.ks < 0.02  # seen: 0.007


@pytest.mark.parametrize("theta", [2.0, 3.0])
def test_planted_rank_one_spike_at_the_bbp_location(theta: float) -> None:
    # X = G / sqrt(N) + theta u v^T, G: N x M Gaussian, c = M / N. Above the BBP threshold
    # theta > c^(1/4) the top singular value leaves the bulk edge 1 + sqrt(c) for
    # sqrt((1 + theta^2)(c + theta^2)) / theta (Benaych-Georges & Nadakuditi 2012); its
    # finite-N fluctuation is O(1/sqrt(N)), about 0.5% here, so 2% is a safe tolerance.
    n_rows, n_cols = 2000, 1000
    rng = np.random.default_rng(1)
    u = rng.standard_normal(n_rows)
    v = rng.standard_normal(n_cols)
    x = gaussian(n_rows, n_cols, seed=2) + theta * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
    sigma = scipy.linalg.svdvals(x)
    fit = rmt.fit_marchenko_pastur(rmt.esd(sigma, n_rows), n_rows, n_cols)
    assert fit.n_spikes == 1
    predicted = math.sqrt((1 + theta**2) * (0.5 + theta**2)) / theta
    assert rmt.bbp_outlier_singular_value(theta, 0.5) == pytest.approx(predicted)
    assert math.sqrt(fit.spikes[0] * n_rows) == pytest.approx(predicted, rel=0.02)
    assert fit.ks is not None and fit.ks < 0.02


def test_signal_below_the_bbp_threshold_makes_no_spike() -> None:
    n_rows, n_cols = 1000, 500
    assert rmt.bbp_outlier_singular_value(0.5, 0.5) is None  # 0.5 < 0.5 ** 0.25
    rng = np.random.default_rng(3)
    u, v = rng.standard_normal(n_rows), rng.standard_normal(n_cols)
    x = gaussian(n_rows, n_cols, seed=4) + 0.5 * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
    fit = rmt.fit_marchenko_pastur(rmt.esd(scipy.linalg.svdvals(x), n_rows), n_rows, n_cols)
    assert fit.n_spikes == 0


@pytest.mark.parametrize("alpha", [2.5, 3.5])
def test_power_law_exponent_recovered_from_pareto_samples(alpha: float) -> None:
    # Pareto with density ~ x^-alpha on [1, inf), by inverse transform. Stated tolerance:
    # |fit - alpha| < 0.1, about 4 standard errors ((alpha - 1) / sqrt(n) = 0.015-0.025 at n=10^4).
    rng = np.random.default_rng(5)
    samples = (1 - rng.random(10_000)) ** (-1 / (alpha - 1))
    fit = rmt.fit_power_law(samples)
    assert fit.alpha == pytest.approx(alpha, abs=0.1)
    assert fit.alpha_sigma == pytest.approx((fit.alpha - 1) / math.sqrt(fit.n_tail))
    assert fit.ks is not None and fit.ks < 0.03
    assert fit.xmin is not None and fit.xmin < 1.2  # the whole sample is a power law


def test_power_law_tail_above_a_different_bulk() -> None:
    # A uniform bulk on [0, 1] below a Pareto tail from 1: the KS choice of xmin finds the
    # junction instead of fitting the bulk too.
    rng = np.random.default_rng(6)
    bulk = rng.random(3000)
    tail = (1 - rng.random(2000)) ** (-1 / 2.0)  # alpha = 3
    fit = rmt.fit_power_law(np.concatenate([bulk, tail]))
    assert fit.xmin is not None and 0.9 < fit.xmin < 1.5
    assert fit.alpha == pytest.approx(3.0, abs=0.15)


def test_too_few_values_leave_alpha_empty_with_the_reason() -> None:
    fit = rmt.fit_power_law(np.arange(1.0, 10.0))
    assert fit.alpha is None and fit.alpha_sigma is None and fit.ks is None
    assert fit.reason == "too few values (9) for a power-law fit"
    diagnostics = rmt.diagnose(np.arange(1.0, 6.0), shape=(5, 8))
    assert diagnostics.metrics()["alpha"] is None and diagnostics.alpha_hat is None
    assert "too few values (5) for a power-law fit" in diagnostics.metrics()["notes"]
    assert diagnostics.mp.n_spikes is None


def test_multiplicities_give_the_same_fit_as_expanded_values() -> None:
    rng = np.random.default_rng(7)
    values = (1 - rng.random(300)) ** (-1 / 1.5)
    counts = rng.integers(1, 5, size=300)
    compact = rmt.fit_power_law(values, counts)
    expanded = rmt.fit_power_law(np.repeat(values, counts))
    assert compact.alpha == pytest.approx(expanded.alpha, rel=1e-12)
    assert compact.xmin == expanded.xmin and compact.n_tail == expanded.n_tail


def test_diagnose_norms_and_alpha_hat() -> None:
    x = gaussian(300, 120, seed=8)
    sigma = scipy.linalg.svdvals(x)
    d = rmt.diagnose(sigma, shape=x.shape)
    assert d.spectral_norm == pytest.approx(np.linalg.norm(x, 2))
    assert d.frobenius_norm == pytest.approx(np.linalg.norm(x, "fro"))
    assert d.stable_rank == pytest.approx(np.linalg.norm(x, "fro") ** 2 / np.linalg.norm(x, 2) ** 2)
    assert d.lambda_max == pytest.approx(sigma[0] ** 2 / 300)
    assert d.alpha_hat == pytest.approx(d.power_law.alpha * math.log10(d.lambda_max))


def test_partial_or_unshaped_spectra_fit_only_what_means_something() -> None:
    sigma = scipy.linalg.svdvals(gaussian(400, 200, seed=9))
    top_k = rmt.diagnose(sigma[:50], shape=(400, 200))
    assert top_k.mp.s2 is None and "50 of 200" in top_k.mp.reason
    assert top_k.power_law.alpha is not None  # a tail fit conditions on x >= xmin: still valid
    unshaped = rmt.diagnose(sigma, shape=None)
    assert unshaped.power_law.alpha is not None and unshaped.alpha_hat is None
    assert unshaped.mp.n_spikes is None and "shape unknown" in unshaped.mp.reason


def test_shuffled_keeps_the_entries_and_is_seeded() -> None:
    weight = np.arange(24.0).reshape(2, 3, 2, 2)
    first, again = rmt.shuffled(weight, 1), rmt.shuffled(weight, 1)
    assert first.shape == weight.shape and np.array_equal(first, again)
    assert np.array_equal(np.sort(first.ravel()), weight.ravel())
    assert not np.array_equal(first, weight)
