"""The ``fft-circulant`` backend: exact singular values of the circularly padded operator.

Sedghi, Gupta, Long (ICLR 2019): with circular padding and stride 1 the convolution is block
circulant and its singular values are those of its matrix symbol on the DFT grid. The
mathematics (half grid, polyphase strides, groups, Gram eigenvalues with an accuracy check,
certified top-k) lives in ``specprof.engine.circulant``, shared with the ``toeplitz`` backend;
this module is the backend: what it supports, what it costs, and its ``Spectrum``.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np

from specprof.engine import hookimpl
from specprof.engine.base import NOMINAL_FLOPS, Backend
from specprof.engine.circulant import (
    Method,
    NumpyOps,
    TorchOps,
    circulant_flops,
    circulant_singular_values,
    circulant_value_count,
    top_k_of,
)
from specprof.engine.parallel import default_threads
from specprof.engine.types import MATRIX_OPS, Layer, Request, Spectrum, Support


class FftCirculantBackend(Backend):
    """Exact singular values of the circularly padded operator (Sedghi et al. 2019)."""

    name: ClassVar[str] = "fft-circulant"
    description: ClassVar[str] = (
        "exact operator spectrum with circular padding: the kernel's symbol on the half grid "
        "(Sedghi et al. 2019), by Gram eigenvalues with an accuracy check or SVD; certified "
        "top-k; polyphase strides, groups, dilation")
    kind = "operator"
    exact: ClassVar[bool] = True
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")

    def __init__(self, method: Method = "auto", threads: int | None = None,
                 _torch_on_cpu: bool = False) -> None:
        if method not in ("auto", "svd", "gram"):
            raise ValueError(f"method must be 'auto', 'svd' or 'gram', not {method!r}")
        self.method: Method = method
        self.threads = threads or default_threads()
        self._torch_on_cpu = _torch_on_cpu

    def supports(self, layer: Layer, request: Request) -> Support:
        if request.device not in self.devices:
            return Support.no(f"device '{request.device}' is not one of {', '.join(self.devices)}")
        if request.device == "cuda":
            cuda = _cuda_support()
            if not cuda:
                return cuda
        if not np.isfinite(layer.weight).all():
            return Support.no("weights contain NaN or Inf")
        if layer.op_type in MATRIX_OPS:
            return Support.yes()
        if not layer.is_conv:
            return Support.no(f"op {layer.op_type} is not a convolution or matrix product")
        if layer.input_shape is None:
            return Support.no("the input size is unknown: pass --input-shape")
        if layer.input_shape[0] != layer.in_channels:
            return Support.no(f"input has {layer.input_shape[0]} channels, the weight expects "
                              f"{layer.in_channels}")
        if request.boundary == "zeros" and not _zeros_equals_circular(layer):
            return Support.no("fft-circulant computes the circular-padding spectrum only; for "
                              "zero padding use the toeplitz or exact backend, or ask for "
                              "boundary 'circular'")
        if layer.op_type == "Conv":
            spatial = layer.input_shape[1:]
            bad = [(n, s) for n, s in zip(spatial, layer.strides, strict=True) if n % s]
            if bad:
                return Support.no(f"input size {'x'.join(map(str, spatial))} is not divisible "
                                  f"by stride {'x'.join(map(str, layer.strides))} (polyphase "
                                  "needs n divisible by s)")
        return Support.yes()

    def cost(self, layer: Layer, request: Request) -> float | None:
        """The flops of the route ``compute`` takes (``specprof.engine.circulant.route_flops``:
        symbols or Gram polynomial, then one SVD, Gram eigensolve or Cholesky certificate per
        half-grid frequency) at ``NOMINAL_FLOPS``."""
        on_numpy = request.device != "cuda" and not self._torch_on_cpu
        flops = circulant_flops(layer, self.method, request.precision, request.top_k, on_numpy)
        return flops / NOMINAL_FLOPS

    def compute(self, layer: Layer, request: Request) -> Spectrum:
        start = time.perf_counter()
        ops = self._ops(request)
        found = circulant_singular_values(layer, self.method, request.precision, request.top_k,
                                          ops)
        values, multiplicities = found.values, found.multiplicities
        complete = request.top_k is None or request.top_k >= circulant_value_count(layer)
        if request.top_k is not None:
            values, multiplicities = top_k_of(values, multiplicities, request.top_k)
        return Spectrum(
            values=values.astype(np.float64),
            kind="operator",
            backend=self.name,
            exact=True,
            multiplicities=None if (multiplicities == 1).all() else multiplicities,
            boundary="circular",
            seconds=time.perf_counter() - start,
            device=ops.device,
            params={**request.params(), "method": self.method},
            note=found.note,
            complete=complete,
        )

    def _ops(self, request: Request) -> Any:
        if request.device == "cuda":
            return TorchOps("cuda")
        if self._torch_on_cpu:
            return TorchOps("cpu")
        return NumpyOps(self.threads)

    def memory(self, layer: Layer, request: Request) -> int | None:
        """The complex symbol matrices of the half grid (three copies: phases, products,
        the SVD's work) and the values with their multiplicities; a matrix layer's SVD."""
        import math

        from specprof.engine.circulant import conv_form, half_grid_size

        values = 3 * 16 * circulant_value_count(layer)
        if layer.op_type in MATRIX_OPS:
            rows, cols = (int(n) for n in layer.weight.shape)
            return 3 * 8 * rows * cols + values
        kernels, grid, strides, _ = conv_form(layer)
        groups, c_out, c_in = (int(n) for n in kernels.shape[:3])
        small = [max(1, n // s) for n, s in zip(grid, strides, strict=True)]
        frequencies = half_grid_size(small)
        symbols = 16 * frequencies * groups * c_out * c_in * math.prod(strides)
        return 3 * symbols + values


def _cuda_support() -> Support:
    try:
        import torch
    except ImportError:
        return Support.no("device cuda needs torch: pip install 'specprof[torch]'")
    if not torch.cuda.is_available():
        return Support.no("device cuda asked but torch sees no CUDA GPU; use --device cpu")
    return Support.yes()


def _zeros_equals_circular(layer: Layer) -> bool:
    """True where zero padding and circular padding give the same operator: a 1x1 kernel with
    no padding never reads past the border (for ConvTranspose only at stride 1, where the
    output grid is the input grid)."""
    if any(k != 1 for k in layer.kernel_shape) or any(p != 0 for p in layer.pads):
        return False
    if layer.op_type == "ConvTranspose":
        return all(s == 1 for s in layer.strides) and all(p == 0 for p in layer.output_padding)
    return True


@hookimpl
def specprof_register_backends() -> list[type]:
    return [FftCirculantBackend]
