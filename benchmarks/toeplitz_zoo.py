"""Measure the ``toeplitz`` backend's approximation candidates and bounds on a zoo of layers.

Run: ``OPENBLAS_NUM_THREADS=1 python benchmarks/toeplitz_zoo.py [--quick] [--layers N] [--seed S]``
(one BLAS thread: on a loaded 2-core machine threaded OpenBLAS made small SVDs 100x slower).

Ground truth: the dense zero-padded matrix from ``tests/oracle.py`` (torch), its exact SVD.
Errors, with sigma_i the true and s_i the approximate values, both sorted descending:
- ``rel``:  mean_i |s_i - sigma_i| / sigma_i over i with sigma_i > 1e-6 sigma_max (per-value
  relative error, the primary metric; "closer than circular" uses it);
- ``abs``:  mean_i |s_i - sigma_i| / sigma_max (error relative to sigma_max);
- ``top``:  |s_1 - sigma_1| / sigma_1.
``bounds ok`` is the fraction of layers with upper >= sigma_max >= lower.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from oracle import conv_matrix, conv_transpose_matrix  # noqa: E402

from specprof.engine.types import Layer  # noqa: E402
from specprof.plugins.backends import toeplitz  # noqa: E402

MAX_DENSE = 1500


def dense_zero_padded(layer: Layer) -> np.ndarray:
    """The layer's exact matrix from the torch oracle (asymmetric pads: pad, then restrict)."""
    d = layer.spatial_dims
    begin, end = layer.pads[:d], layer.pads[d:]
    if layer.op_type == "ConvTranspose":
        return conv_transpose_matrix(layer.weight.copy(), layer.input_shape, stride=layer.strides,
                                     padding=begin, output_padding=layer.output_padding,
                                     dilation=layer.dilations, groups=layer.groups)
    c, *n = layer.input_shape
    padded = (c, *(v + b + e for v, b, e in zip(n, begin, end, strict=True)))
    full = conv_matrix(layer.weight.copy(), padded, stride=layer.strides,
                       dilation=layer.dilations, groups=layer.groups)
    mask = np.zeros(padded, dtype=bool)
    mask[(slice(None), *(slice(b, b + v) for b, v in zip(begin, n, strict=True)))] = True
    return full[:, mask.ravel()]


def true_singular_values(layer: Layer) -> np.ndarray:
    """Exact singular values, descending, from the Gram matrix of the smaller side (eigvalsh is
    several times faster than an SVD; values below ~1e-8 sigma_max lose relative accuracy,
    which the metrics below ignore)."""
    matrix = dense_zero_padded(layer)
    gram = matrix.T @ matrix if matrix.shape[1] <= matrix.shape[0] else matrix @ matrix.T
    return np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None))


def random_layer(rng: np.random.Generator, index: int) -> Layer:
    """A random conv layer whose dense matrix has at most MAX_DENSE rows and columns."""
    while True:
        d = int(rng.choice([1, 2, 2, 2, 2, 2, 3]))
        k = int(rng.choice([1, 2, 3, 3, 3, 5, 5, 7]))
        s = int(rng.choice([1, 1, 1, 2]))
        dil = int(rng.choice([1, 1, 1, 1, 2])) if k > 1 else 1
        groups = int(rng.choice([1, 1, 1, 2, 4, 0]))  # 0: depthwise
        cin = int(rng.choice([1, 2, 3, 4, 8, 16, 32, 64]))
        cout = int(rng.choice([1, 2, 3, 4, 8, 16, 32, 64]))
        if groups == 0:
            groups, cout = cin, cin
        if cin % groups or cout % groups:
            continue
        if d == 3 and k > 3:  # the torch oracle is slow on big 3d kernels
            continue
        n = int(rng.integers(4, 33)) if d < 3 else int(rng.integers(4, 9))
        reach = dil * (k - 1)
        mode = rng.choice(["same", "same", "same", "valid", "asym"])
        if mode == "same":
            pads = (reach // 2,) * d + ((reach + 1) // 2,) * d
        elif mode == "valid":
            pads = (0,) * (2 * d)
        else:
            pads = tuple(int(rng.integers(0, reach + 1)) for _ in range(2 * d))
        transpose = bool(rng.random() < 0.15) and mode != "asym"
        if transpose:
            pads = (reach // 2,) * (2 * d)
            shape = (cout, cin // groups, *(k,) * d)
            op = (s - 1,) * d if s > 1 else (0,) * d
            layer = Layer(f"t{index}", "ConvTranspose", rng.standard_normal(shape) / math.sqrt(cin * k**d),
                          strides=(s,) * d, pads=pads, dilations=(dil,) * d, groups=groups,
                          output_padding=op, input_shape=(cout, *(n,) * d))
        else:
            shape = (cout, cin // groups, *(k,) * d)
            layer = Layer(f"c{index}", "Conv", rng.standard_normal(shape) / math.sqrt(cin * k**d),
                          strides=(s,) * d, pads=pads, dilations=(dil,) * d, groups=groups,
                          input_shape=(cin, *(n,) * d))
        geom = toeplitz.conv_geometry(layer)
        if min(geom.out) < 1 or max(geom.shape) > MAX_DENSE or min(geom.shape) < 4:
            continue
        return layer


def errors(approx: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """(rel, abs, top) as defined in the module docstring."""
    keep = truth > 1e-6 * truth[0]
    diff = np.abs(approx - truth)
    return (float(np.mean(diff[keep] / truth[keep])), float(np.mean(diff) / truth[0]),
            float(diff[0] / truth[0]))


def candidates() -> dict[str, dict]:
    """name -> keyword arguments of ``approximate_singular_values`` (``top``: use the
    power-iteration estimate of sigma_max as the anchor)."""
    out: dict[str, dict] = {"circular": {"alpha": 0.0, "adjust": "none"},
                            "frobenius (baseline)": {"alpha": 0.0, "adjust": "frobenius"}}
    for alpha in (0.5, 1.0):
        out[f"grid a={alpha} + frobenius"] = {"alpha": alpha, "adjust": "frobenius"}
    out["grid a=1.0 no adjustment"] = {"alpha": 1.0, "adjust": "none"}
    for alpha in (0.0, 0.5, 1.0):
        out[f"grid a={alpha} + anchored"] = {"alpha": alpha, "adjust": "anchored", "top": True}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 layers instead of 80")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--seed", type=int, default=2020)
    args = parser.parse_args()
    count = args.layers or (12 if args.quick else 80)
    rng = np.random.default_rng(args.seed)
    cands = candidates()
    results = {name: [] for name in cands}
    upper_ratio, lower_ratio, bounds_ok, seconds = [], [], [], []
    started = time.perf_counter()
    for i in range(count):
        layer = random_layer(rng, i)
        geom = toeplitz.conv_geometry(layer)
        truth = true_singular_values(layer)[: geom.n_values]
        t0 = time.perf_counter()
        lower, upper = toeplitz.sigma_max_bracket(geom)
        seconds.append(time.perf_counter() - t0)
        for name, kwargs in cands.items():
            kwargs = {**kwargs, "top": lower if kwargs.get("top") else None}
            approx = toeplitz.approximate_singular_values(geom, **kwargs)
            assert approx.size == truth.size, (layer.describe(), approx.size, truth.size)
            results[name].append(errors(approx, truth))
        upper_ratio.append(upper / truth[0])
        lower_ratio.append(lower / truth[0])
        bounds_ok.append(upper >= truth[0] * (1 - 1e-12) and lower <= truth[0] * (1 + 1e-12))
    circ = np.array(results["circular"])
    # Layers where circular is already exact (1x1, some 'valid' ones) are ties, not wins.
    open_rel, open_abs = circ[:, 0] > 1e-9, circ[:, 1] > 1e-9
    print(f"{count} layers (seed {args.seed}), {time.perf_counter() - started:.1f} s")
    print(f"{int(open_abs.sum())} layers where circular is not exact; 'beats' = fraction of "
          "those where the candidate's error is smaller (by rel / by abs)")
    print(f"{'candidate':28s} {'rel':>7s} {'abs':>7s} {'top':>7s} {'beats rel':>9s} {'beats abs':>9s}")
    for name, rows in results.items():
        arr = np.array(rows)
        win_rel = float(np.mean(arr[open_rel, 0] < circ[open_rel, 0]))
        win_abs = float(np.mean(arr[open_abs, 1] < circ[open_abs, 1]))
        print(f"{name:28s} {100 * arr[:, 0].mean():6.2f}% {100 * arr[:, 1].mean():6.2f}% "
              f"{100 * arr[:, 2].mean():6.2f}% {win_rel:9.2f} {win_abs:9.2f}")
    up, lo = np.array(upper_ratio), np.array(lower_ratio)
    print(f"bounds ok on {100 * np.mean(bounds_ok):.0f}% of the zoo; upper/true mean {up.mean():.4f} "
          f"(median {np.median(up):.4f}, max {up.max():.4f}); lower/true mean {lo.mean():.5f} "
          f"(min {lo.min():.5f}); bounds time mean {np.mean(seconds) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
