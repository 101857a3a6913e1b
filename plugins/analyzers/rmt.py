"""Random-matrix diagnostics of one layer's singular values: pure math on arrays.

Conventions (Martin & Mahoney's, as in WeightWatcher): a layer is an N x M matrix with
N >= M (its transpose otherwise); its empirical spectral density (ESD) is that of the
eigenvalues ``lambda = sigma**2 / N`` of ``W^T W / N``, one per singular value. A matrix of i.i.d.
entries of variance s2 has, as N, M grow with ``q = M / N`` fixed, the Marchenko-Pastur (MP)
density on ``[s2 (1 - sqrt q)^2, s2 (1 + sqrt q)^2]``; eigenvalues above that bulk are
*spikes* (signal, or "correlation traps" when the weights are shuffled). Trained layers depart
from MP in a heavy tail ``p(lambda) ~ lambda^(-alpha)``, whose exponent ``alpha`` is fitted
by Clauset, Shalizi & Newman's (2009) maximum-likelihood method with ``xmin`` chosen by the
Kolmogorov-Smirnov distance.

Spectra may carry multiplicities (a 1x1 convolution's operator repeats each value n1*n2
times): every function takes ``values`` with optional ``counts`` and never expands them.
Nothing here returns a number that does not mean something: fits that cannot be made return
None fields and a ``reason``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MIN_POWERLAW_VALUES = 20
"""Fewer nonzero eigenvalues than this and a power-law fit means nothing."""
MIN_TAIL_VALUES = 10
"""The fitted tail (values >= xmin) must hold at least this many eigenvalues."""
MAX_XMIN_CANDIDATES = 400
"""xmin candidates tried (evenly spread over the distinct values): bounds the cost at
O(candidates x distinct values) for operator spectra with 10^5 distinct values."""
MIN_MP_VALUES = 10
"""Fewer eigenvalues than this and an MP bulk fit means nothing."""
TW1_Q99 = 2.02
"""99th percentile of the Tracy-Widom (beta = 1) law (Johnstone 2001, Table 1): the largest
eigenvalue of a pure-noise matrix stays below the edge plus this many TW scales 99% of the time,
so a spike must clear that margin, not just the asymptotic edge."""


# --- small helpers ------------------------------------------------------------------------------


def _weighted(values: np.ndarray, counts: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values ascending with their counts (ties merged), from values + multiplicities."""
    values = np.asarray(values, dtype=np.float64).ravel()
    counts_arr = (np.ones(values.shape, dtype=np.int64) if counts is None
                  else np.asarray(counts, dtype=np.int64).ravel())
    if counts_arr.shape != values.shape:
        raise ValueError("counts must match values")
    keep = np.isfinite(values)
    unique, inverse = np.unique(values[keep], return_inverse=True)
    merged = np.bincount(inverse, weights=counts_arr[keep], minlength=unique.size).astype(np.int64)
    return unique, merged


def esd(singular_values: np.ndarray, n_rows: int) -> np.ndarray:
    """Eigenvalues of the ESD: ``sigma**2 / N`` where N is the matrix's larger dimension."""
    return np.asarray(singular_values, dtype=np.float64) ** 2 / float(n_rows)


def weighted_quantile(values: np.ndarray, counts: np.ndarray, q: float) -> float:
    """The q-quantile of ``values`` (ascending, distinct) repeated ``counts`` times."""
    cumulative = np.cumsum(counts)
    index = int(np.searchsorted(cumulative, q * cumulative[-1], side="left"))
    return float(values[min(index, values.size - 1)])


def ks_distance(values: np.ndarray, counts: np.ndarray, cdf: np.ndarray) -> float:
    """sup_x |ECDF(x) - F(x)| for ``values`` ascending and distinct, ``cdf`` = F at them.

    The ECDF is a step function, so the sup is at a jump, on one side or the other; ties
    (multiplicities) jump by their count at once, so only the two ends of each jump count.
    """
    total = counts.sum()
    after = np.cumsum(counts) / total
    before = after - counts / total
    return float(max(np.max(np.abs(cdf - after)), np.max(np.abs(cdf - before))))


# --- Marchenko-Pastur ---------------------------------------------------------------------------


def mp_edges(q: float, s2: float) -> tuple[float, float]:
    """Bulk edges ``s2 (1 -+ sqrt q)^2`` of the MP law with ratio q = M/N <= 1, variance s2."""
    root = math.sqrt(q)
    return s2 * (1 - root) ** 2, s2 * (1 + root) ** 2


def mp_pdf(x: np.ndarray, q: float, s2: float) -> np.ndarray:
    """MP density ``sqrt((b - x)(x - a)) / (2 pi s2 q x)`` on [a, b], zero outside (q <= 1)."""
    a, b = mp_edges(q, s2)
    x = np.asarray(x, dtype=np.float64)
    inside = (x > a) & (x < b)
    out = np.zeros_like(x)
    xi = x[inside]
    out[inside] = np.sqrt((b - xi) * (xi - a)) / (2 * math.pi * s2 * q * xi)
    return out


def mp_cdf(x: np.ndarray, q: float, s2: float, grid: int = 4096) -> np.ndarray:
    """MP distribution function, by integrating the density on a fine grid.

    The substitution x = a + (b - a) sin^2(t) removes the square-root singularities at the
    edges, so a plain trapezoid rule on t is accurate to ~1e-7 with 4096 points.
    """
    a, b = mp_edges(q, s2)
    t = np.linspace(0.0, math.pi / 2, grid)
    xs = a + (b - a) * np.sin(t) ** 2
    # dx = (b - a) 2 sin t cos t dt and sqrt((b-x)(x-a)) = (b - a) sin t cos t
    density_dt = np.zeros_like(t)
    positive = xs > 0
    density_dt[positive] = ((b - a) ** 2 * 2 * (np.sin(t) * np.cos(t)) ** 2)[positive] / (
        2 * math.pi * s2 * q * xs[positive])
    cumulative = np.concatenate([[0.0], np.cumsum((density_dt[1:] + density_dt[:-1]) / 2 * np.diff(t))])
    cumulative /= cumulative[-1]  # the remaining ~1e-7 quadrature error, not a fudge of the law
    return np.interp(np.asarray(x, dtype=np.float64), xs, cumulative, left=0.0, right=1.0)


def _mp_median(q: float) -> float:
    """Median of the MP law with variance 1: s2 scales it, so median(ESD) / this estimates s2."""
    a, b = mp_edges(q, 1.0)
    xs = np.linspace(a, b, 8192)
    return float(np.interp(0.5, mp_cdf(xs, q, 1.0), xs))


def tracy_widom_margin(n_rows: int, n_cols: int) -> float:
    """How far above the MP edge (relative to it) a pure-noise largest eigenvalue may lie.

    Johnstone (2001): for an N x M Gaussian matrix of unit variance the largest eigenvalue of
    W^T W is about mu + s * TW1 with mu = (sqrt(N - 1) + sqrt M)^2 and
    s = (sqrt(N - 1) + sqrt M)(1/sqrt(N - 1) + 1/sqrt M)^(1/3). The margin is the 99% quantile
    of that, relative to mu.
    """
    root_n, root_m = math.sqrt(max(n_rows - 1, 1)), math.sqrt(n_cols)
    mu = (root_n + root_m) ** 2
    scale = (root_n + root_m) * (1 / root_n + 1 / root_m) ** (1 / 3)
    return TW1_Q99 * scale / mu


@dataclass(frozen=True)
class MPFit:
    """The Marchenko-Pastur fit of an ESD's bulk; None fields and a ``reason`` when not made."""

    q: float | None = None
    """Aspect ratio M / N <= 1 of the matrix."""
    s2: float | None = None
    """Fitted entry variance: the bulk scale."""
    lambda_minus: float | None = None
    lambda_plus: float | None = None
    """Bulk edge; ``threshold`` (the edge plus the Tracy-Widom margin) separates spikes."""
    threshold: float | None = None
    n_spikes: int | None = None
    spikes: np.ndarray = field(default_factory=lambda: np.empty(0))
    """The spike eigenvalues, descending (each repeated by its multiplicity)."""
    ks: float | None = None
    """KS distance between the bulk (spikes removed) and the fitted MP law."""
    reason: str = ""


def fit_marchenko_pastur(eigenvalues: np.ndarray, n_rows: int, n_cols: int,
                         counts: np.ndarray | None = None, max_iter: int = 100) -> MPFit:
    """Fit MP to the bulk of the ESD ``eigenvalues`` of an ``n_rows x n_cols`` matrix.

    The ESD must be complete (one eigenvalue per singular value, min(n_rows, n_cols) of them
    with multiplicities): a top-k spectrum has no bulk to fit. The variance is estimated
    from the median, which spikes and heavy tails barely move, then refined with the spikes
    removed until the spike count is stable (a fixed point, typically 2-3 rounds).
    """
    n_big, n_small = max(n_rows, n_cols), min(n_rows, n_cols)
    values, weights = _weighted(eigenvalues, counts)
    total = int(weights.sum())
    if total < MIN_MP_VALUES:
        return MPFit(reason=f"too few values ({total}) for a Marchenko-Pastur fit")
    if total != n_small:
        return MPFit(reason=f"spectrum holds {total} of {n_small} values (top-k?): no bulk to fit")
    q = n_small / n_big
    median_unit = _mp_median(q)
    margin = 1 + tracy_widom_margin(n_big, n_small)
    s2 = weighted_quantile(values, weights, 0.5) / median_unit
    bulk_size = total
    for _ in range(max_iter):
        if s2 <= 0:
            return MPFit(q=q, reason="median eigenvalue is zero: the layer is (mostly) rank deficient")
        threshold = mp_edges(q, s2)[1] * margin
        in_bulk = values <= threshold
        new_size = int(weights[in_bulk].sum())
        # The M - k eigenvalues left once the k spikes are removed follow MP (to O(k/M)).
        s2 = weighted_quantile(values[in_bulk], weights[in_bulk], 0.5) / median_unit
        if new_size == bulk_size:
            break
        bulk_size = new_size
    lower, upper = mp_edges(q, s2)
    threshold = upper * margin
    in_bulk = values <= threshold
    spikes = np.repeat(values[~in_bulk], weights[~in_bulk])[::-1]
    bulk_cdf = mp_cdf(values[in_bulk], q, s2)
    ks = ks_distance(values[in_bulk], weights[in_bulk], bulk_cdf) if in_bulk.any() else None
    return MPFit(q=q, s2=s2, lambda_minus=lower, lambda_plus=upper, threshold=threshold,
                 n_spikes=int(spikes.size), spikes=spikes, ks=ks)


def bbp_outlier_singular_value(theta: float, q: float) -> float | None:
    """Where a rank-1 signal of strength ``theta`` puts the top singular value of
    ``G / sqrt(N) + theta u v^T`` (G: N x M Gaussian, q = M / N <= 1, unit u, v).

    Benaych-Georges & Nadakuditi (2012), Sec. 3.1: above the BBP threshold theta > q^(1/4)
    the outlier sits at ``sqrt((1 + theta^2)(q + theta^2)) / theta``; below it, no outlier
    (None) and the top value sticks to the bulk edge 1 + sqrt(q).
    """
    if theta <= q ** 0.25:
        return None
    return math.sqrt((1 + theta**2) * (q + theta**2)) / theta


# --- power law ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerLawFit:
    """A continuous power-law fit ``p(x) ~ x^(-alpha)`` for x >= xmin; None fields + reason if none."""

    alpha: float | None = None
    alpha_sigma: float | None = None
    """Standard error (alpha - 1) / sqrt(n_tail) (Clauset et al., eq. 3.2)."""
    xmin: float | None = None
    ks: float | None = None
    n_tail: int | None = None
    n_values: int = 0
    reason: str = ""


def fit_power_law(values: np.ndarray, counts: np.ndarray | None = None, *,
                  min_values: int = MIN_POWERLAW_VALUES, min_tail: int = MIN_TAIL_VALUES,
                  max_candidates: int = MAX_XMIN_CANDIDATES) -> PowerLawFit:
    """Clauset-Shalizi-Newman fit of the tail of ``values`` (e.g. ESD eigenvalues).

    For each candidate xmin the MLE is ``alpha = 1 + n / sum(ln(x_i / xmin))`` over the n
    values x_i >= xmin; the xmin kept is the one whose fitted law is closest to the tail's
    ECDF in KS distance. A tail fit conditions on x >= xmin only, so it stays valid on a
    top-k spectrum as long as xmin lies inside it (it always does here).
    """
    unique, weights = _weighted(values, counts)
    positive = unique > 0
    unique, weights = unique[positive], weights[positive]
    total = int(weights.sum())
    if total < min_values or unique.size < 2:
        return PowerLawFit(n_values=total, reason=f"too few values ({total}) for a power-law fit")
    logs = np.log(unique)
    # Suffix sums: tail size and sum of log values for xmin = unique[i].
    tail_n = np.cumsum(weights[::-1])[::-1]
    tail_log = np.cumsum((weights * logs)[::-1])[::-1]
    candidates = np.flatnonzero(tail_n >= min_tail)[:-1]  # the last distinct value has no tail
    if candidates.size == 0:
        return PowerLawFit(n_values=total, reason=f"too few values ({total}) for a power-law fit")
    if candidates.size > max_candidates:
        candidates = candidates[np.unique(np.linspace(0, candidates.size - 1, max_candidates).astype(int))]
    best: tuple[float, float, int] | None = None
    for i in candidates:
        spread = tail_log[i] - tail_n[i] * logs[i]
        if spread <= 0:
            continue
        alpha = 1 + tail_n[i] / spread
        tail = unique[i:]
        cdf = 1 - (tail / unique[i]) ** (1 - alpha)
        distance = ks_distance(tail, weights[i:], cdf)
        if best is None or distance < best[0]:
            best = (distance, alpha, int(i))
    if best is None:
        return PowerLawFit(n_values=total, reason="all values equal: no tail to fit")
    distance, alpha, i = best
    n_tail = int(tail_n[i])
    return PowerLawFit(alpha=float(alpha), alpha_sigma=float((alpha - 1) / math.sqrt(n_tail)),
                       xmin=float(unique[i]), ks=distance, n_tail=n_tail, n_values=total)


# --- one layer ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerDiagnostics:
    """Everything the spectral analyzer reports for one spectrum (None: not meaningful)."""

    n_values: int
    spectral_norm: float | None
    frobenius_norm: float | None
    stable_rank: float | None
    lambda_max: float | None
    mp: MPFit
    power_law: PowerLawFit
    alpha_hat: float | None
    notes: tuple[str, ...] = ()

    def metrics(self) -> dict[str, float | int | str | None]:
        """Flat, JSON-ready metrics (the keys of the analyzer's per-layer row)."""
        return {
            "n_values": self.n_values, "spectral_norm": self.spectral_norm,
            "frobenius_norm": self.frobenius_norm, "stable_rank": self.stable_rank,
            "lambda_max": self.lambda_max, "alpha": self.power_law.alpha,
            "alpha_sigma": self.power_law.alpha_sigma, "alpha_hat": self.alpha_hat,
            "pl_xmin": self.power_law.xmin, "pl_ks": self.power_law.ks,
            "pl_n_tail": self.power_law.n_tail, "mp_q": self.mp.q, "mp_s2": self.mp.s2,
            "mp_lambda_plus": self.mp.lambda_plus, "n_spikes": self.mp.n_spikes,
            "mp_ks": self.mp.ks, "notes": "; ".join(self.notes) or None,
        }


def diagnose(singular_values: np.ndarray, counts: np.ndarray | None = None,
             shape: tuple[int, int] | None = None) -> LayerDiagnostics:
    """All diagnostics of one layer's singular values (any order, optional multiplicities).

    ``shape`` is the (rows, cols) of the matrix whose singular values these are; without it
    the ESD cannot be normalized, so the MP fit and alpha-hat are None (alpha, being scale
    free, is still fitted).
    """
    unique, weights = _weighted(singular_values, counts)
    n_values = int(weights.sum())
    notes: list[str] = []
    if n_values == 0:
        empty = "no singular values"
        return LayerDiagnostics(0, None, None, None, None, MPFit(reason=empty),
                                PowerLawFit(reason=empty), None, (empty,))
    sigma_max = float(unique[-1])
    frobenius = float(math.sqrt(np.sum(weights * unique**2)))
    stable_rank = frobenius**2 / sigma_max**2 if sigma_max > 0 else None
    if shape is None:
        scale = 1.0
        mp = MPFit(reason="matrix shape unknown: the ESD cannot be normalized")
    else:
        scale = float(max(shape))
        mp = fit_marchenko_pastur(unique**2 / scale, shape[0], shape[1], weights)
    eigen = unique**2 / scale
    power_law = fit_power_law(eigen, weights)
    lambda_max = float(eigen[-1]) if shape is not None else None
    alpha_hat = None
    if power_law.alpha is not None and lambda_max is not None and lambda_max > 0:
        alpha_hat = power_law.alpha * math.log10(lambda_max)
    for reason in (mp.reason, power_law.reason):
        if reason:
            notes.append(reason)
    return LayerDiagnostics(n_values, sigma_max, frobenius, stable_rank, lambda_max, mp,
                            power_law, alpha_hat, tuple(notes))


def shuffled(weight: np.ndarray, seed: int) -> np.ndarray:
    """The same weights in a random order (a seeded permutation of all entries).

    Shuffling keeps the entries' distribution and destroys their correlations: the result's
    ESD should be MP, and eigenvalues it still has above the bulk come from a few very large
    entries ("correlation traps", Martin & Mahoney).
    """
    rng = np.random.default_rng(seed)
    flat = np.asarray(weight).ravel().copy()
    rng.shuffle(flat)
    return flat.reshape(np.shape(weight))
