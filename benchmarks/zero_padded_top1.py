"""ResNet-50's zero-padded sigma_max, every conv, as ``specprof profile MODEL --top-k 1`` computes it.

Run: ``python benchmarks/zero_padded_top1.py`` (also a row of ``benchmarks/backends.py``).
The model is ``benchmarks/resnets.py``'s ResNet-50 (random weights, BatchNorm folded by the
eval-mode ONNX export, 53 convs at 224x224). Printed, all from this run:
- the ``exact`` backend's top-1 over the 53 convs (the zero-padded solver of
  ``specprof.engine.zero_padded``), the float64 GEMM rate, and the time scaled to the issue's
  reference machine (GEMM 87 GFLOP/s): seconds * rate / 87;
- the whole CLI command (process start, load, normalize, store) timed as a user runs it;
- agreement with an independent oracle on three layers of different kinds: ARPACK
  (``scipy.sparse.linalg.svds``, tol=0) on a LinearOperator built on torch's own conv2d and
  conv_transpose2d in float64.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REFERENCE_GFLOPS = 87.0
"""The issue's reference machine: 2 cores at float64 GEMM 87 GFLOP/s."""
ORACLE_LAYERS = ("stages.3.1/conv2", "stages.2.0/conv2", "stages.3.0/downsample")
"""3x3 512->512 at 7x7, 3x3 stride 2 256->256 at 28x28, 1x1 stride 2 1024->2048 at 14x14."""


def gemm_rate() -> float:
    """float64 GEMM rate of this machine in flop/s (best of 3, 2048^2)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2048, 2048)), rng.standard_normal((2048, 2048))
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        np.dot(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def torch_oracle(layer) -> float:  # type: ignore[no-untyped-def]
    """sigma_max by ARPACK on torch's float64 conv2d / conv_transpose2d (symmetric pads)."""
    import scipy.sparse.linalg
    import torch
    import torch.nn.functional as F

    w = torch.tensor(np.asarray(layer.weight, dtype=np.float64))
    pad, stride = tuple(layer.pads[:2]), tuple(layer.strides)
    shape_in = (1, *layer.input_shape)
    out = F.conv2d(torch.zeros(shape_in, dtype=torch.float64), w, stride=stride, padding=pad).shape
    extra = tuple(n + 2 * p - ((o - 1) * s + k) for n, p, o, s, k in zip(
        layer.input_shape[1:], pad, out[2:], stride, w.shape[2:], strict=True))
    operator = scipy.sparse.linalg.LinearOperator(
        (math.prod(out), math.prod(shape_in)), dtype=np.float64,
        matvec=lambda x: F.conv2d(torch.tensor(x).reshape(shape_in), w, stride=stride,
                                  padding=pad).numpy().ravel(),
        rmatvec=lambda y: F.conv_transpose2d(torch.tensor(y).reshape(out), w, stride=stride,
                                             padding=pad, output_padding=extra).numpy().ravel())
    values = scipy.sparse.linalg.svds(operator, k=1, tol=0, return_singular_vectors=False,
                                      rng=np.random.default_rng(1))
    return float(values[0])


def run(rate: float, quick: bool = False) -> None:
    """Print the ResNet-50 zero-padded top-1 rows (``quick``: one oracle layer)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from resnets import build_resnet50_onnx

    from specprof.engine.api import load_model
    from specprof.engine.types import Request
    from specprof.plugins.backends.exact import ExactBackend

    with tempfile.TemporaryDirectory() as folder:
        path = build_resnet50_onnx(Path(folder) / "resnet50.onnx")
        convs = [layer for layer in load_model(path).layers if layer.is_conv]
        backend, request = ExactBackend(), Request(top_k=1)
        start = time.perf_counter()
        spectra = [backend.compute(layer, request) for layer in convs]
        seconds = time.perf_counter() - start
        closed = sum(s.upper_bound - s.lower_bound <= 1e-6 * s.upper_bound for s in spectra)
        scale = rate / (REFERENCE_GFLOPS * 1e9)
        print(f"\nResNet-50 at 224x224, zero padding, sigma_max of all {len(convs)} convs "
              f"(exact --top-k 1); GEMM {rate / 1e9:.1f} GFLOP/s")
        print(f"{'what':38s} {'seconds':>8s} {'scaled':>8s}  note")
        print(f"{'backend alone':38s} {seconds:8.2f} {seconds * scale:8.2f}  "
              f"target <= 20 s scaled; bracket closed on {closed} of {len(convs)}")
        command = [sys.executable, "-m", "specprof", "profile", str(path), "--top-k", "1",
                   "--db", str(Path(folder) / "bench.db"), "-q", "--output-format", "csv"]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        cli = time.perf_counter() - start
        print(f"{'specprof profile MODEL --top-k 1 (CLI)':38s} {cli:8.2f} {cli * scale:8.2f}  "
              "process start, load, normalize, store included")
        by_name = {layer.name: (layer, spectrum) for layer, spectrum in zip(convs, spectra,
                                                                             strict=True)}
        for key in ORACLE_LAYERS[:1] if quick else ORACLE_LAYERS:
            name = next(n for n in by_name if key in n)
            layer, spectrum = by_name[name]
            start = time.perf_counter()
            truth = torch_oracle(layer)
            oracle_s = time.perf_counter() - start
            print(f"  oracle {layer.describe():34s} rel diff "
                  f"{abs(spectrum.values[0] - truth) / truth:.1e} (ours {spectrum.seconds:.2f} s, "
                  f"torch ARPACK {oracle_s:.1f} s)")


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    measured = gemm_rate()
    print(f"cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    run(measured, quick="--quick" in sys.argv)
