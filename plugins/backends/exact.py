"""The ground truth: singular values of a layer's true matrix.

Small layers: build the dense matrix (``specprof.engine.operator``) and take all singular values
with LAPACK (``scipy.linalg.svdvals``), or with ``torch.linalg.svdvals`` on a CUDA device.
Any size with ``--top-k K``: the K largest values matrix-free. A zero-padded convolution goes
through ``specprof.engine.zero_padded.top_singular_values``: Lanczos on A^T A from the top of
the circulant embedding's symbol, fast products (torch's float32 convolutions where torch is
installed), every value checked with float64 products (its residual certifies it within
``TOP_K_TOLERANCE`` of a singular value of A), and a certified bracket on sigma_max stored in
``lower_bound``/``upper_bound``. Other layers (circular boundary, negative pads, matrices) use
ARPACK (``scipy.sparse.linalg.svds``) on a ``LinearOperator`` whose products are the layer's map
and its adjoint.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any, ClassVar

import numpy as np

from specprof.engine import hookimpl
from specprof.engine.base import Backend
from specprof.engine.costs import (
    dense_svd_seconds,
    matrix_free_top_k_seconds,
    zero_padded_top_k_seconds,
)
from specprof.engine.dense import matrix_singular_values
from specprof.engine.errors import BackendError, SpecprofError
from specprof.engine.operator import (
    ConvApply,
    conv_geometry,
    dense_operator,
    group_blocks,
    operator_shape,
)
from specprof.engine.parallel import one_blas_thread
from specprof.engine.types import Layer, Request, Spectrum, SpectrumKind, Support
from specprof.engine.zero_padded import top_singular_values

MAX_DENSE_BYTES = 2**30
"""Largest dense matrix the exact backend builds (1 GiB)."""
SPARE_VALUES = 2
"""Values the matrix-free top-k solve computes beyond the k asked for, k > 1 (see ``_top_k``)."""
TOP_K_TOLERANCE = 1e-6
"""Certified relative distance of each zero-padded top-k value to a singular value of A."""

_ALTERNATIVE = "use --top-k K for the largest values, or the fft-circulant/toeplitz backends"


def _cuda_support() -> Support:
    """Whether torch with a CUDA device is usable (imports torch only if it is installed)."""
    if importlib.util.find_spec("torch") is None:
        return Support.no("device cuda needs torch: pip install 'specprof[torch]'")
    import torch

    if not torch.cuda.is_available():
        return Support.no("device cuda asked, but torch finds no CUDA device: use --device cpu")
    return Support.yes()


def _boundary(layer: Layer, request: Request) -> Any:
    return request.boundary if layer.is_conv else None


def _zero_padded_conv(layer: Layer, request: Request) -> bool:
    """Whether the top-k goes through ``top_singular_values`` (zero padding, no cropping)."""
    return layer.is_conv and request.boundary == "zeros" and min(layer.pads, default=0) >= 0


class ExactBackend(Backend):
    """All singular values of the dense operator, or the top K matrix-free."""

    name: ClassVar[str] = "exact"
    description: ClassVar[str] = (
        "exact singular values of the true operator: dense SVD for small layers, "
        "matrix-free ARPACK top-k for any size"
    )
    kind: ClassVar[SpectrumKind] = "operator"
    exact: ClassVar[bool] = True
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")

    def __init__(self, *, _torch_device: str | None = None) -> None:
        # Private: run the dense SVD through torch on this device (tests use "cpu").
        self._torch_device = _torch_device

    # -- planning -------------------------------------------------------------------------

    def _device(self, request: Request) -> str:
        if self._torch_device is not None:
            return self._torch_device
        if request.device == "auto":
            return "cuda" if _cuda_support() else "cpu"
        return request.device

    def _dense_refusal(self, rows: int, cols: int, request: Request) -> str:
        """Why the dense matrix is too big for this request, or '' if it is not."""
        itemsize = 4 if request.precision == "float32" else 8
        if min(rows, cols) > request.max_dense:
            return (f"operator is {rows} x {cols}, above the dense limit "
                    f"{request.max_dense}: {_ALTERNATIVE}")
        if rows * cols * itemsize > MAX_DENSE_BYTES:
            gib = rows * cols * itemsize / 2**30
            return f"dense operator {rows} x {cols} would take {gib:.1f} GiB: {_ALTERNATIVE}"
        return ""

    def supports(self, layer: Layer, request: Request) -> Support:
        if layer.is_conv and layer.input_shape is None:
            return Support.no("input size unknown: pass --input-shape C,H,W")
        try:
            rows, cols = operator_shape(layer, request.boundary)
        except SpecprofError as error:
            return Support.no(error.one_line())
        device = self._device(request)
        if device not in self.devices:
            return Support.no(f"device {device} is not supported: use --device cpu or cuda")
        if device == "cuda" and self._torch_device is None:
            cuda = _cuda_support()
            if not cuda:
                return cuda
        k = request.top_k
        if k is not None:
            if k < 1:
                return Support.no(f"--top-k must be positive, got {k}")
            if k < min(rows, cols) - 1:
                return Support.yes(f"matrix-free top-{k} of a {rows} x {cols} operator")
        if not layer.is_conv:
            # The matrix is the weight, already in memory; its SVD needs its smaller side
            # squared (the Gram) or one copy (float64), never a dense operator built anew.
            if min(rows, cols) > request.max_dense:
                return Support.no(f"matrix is {rows} x {cols}, above the dense limit "
                                  f"{request.max_dense}: use --max-dense or --top-k K")
            return Support.yes("matrix layer: dense SVD of the weight")
        block_rows, block_cols = operator_shape(group_blocks(layer)[0], request.boundary)
        refusal = self._dense_refusal(block_rows, block_cols, request)
        if refusal:
            return Support.no(refusal)
        blocks = f" in {layer.groups} diagonal blocks" if layer.groups > 1 else ""
        return Support.yes(f"small enough for the dense SVD ({rows} x {cols}{blocks})")

    def cost(self, layer: Layer, request: Request) -> float | None:
        rows, cols = operator_shape(layer, request.boundary)
        k = request.top_k
        if k is not None and k < min(rows, cols) - 1:
            if _zero_padded_conv(layer, request):
                return zero_padded_top_k_seconds(layer, k)
            return matrix_free_top_k_seconds(layer, request.boundary, k)
        return dense_svd_seconds(layer, request.boundary)

    # -- computing ------------------------------------------------------------------------

    def compute(self, layer: Layer, request: Request) -> Spectrum:
        start = time.perf_counter()
        if not np.isfinite(layer.weight).all():
            raise BackendError(
                f"layer {layer.name} has non-finite weights (NaN or Inf)",
                "check the model file or its training; the layer's spectrum is undefined",
            )
        rows, cols = operator_shape(layer, request.boundary)
        device = self._device(request)
        note = ""
        k = request.top_k
        partial = k is not None and k < min(rows, cols) - 1
        lower = upper = None
        if partial and _zero_padded_conv(layer, request):
            values, lower, upper, note = self._zero_padded_top_k(layer, k)
            device = "cpu"
        elif partial:
            values = self._top_k(layer, request, k)
            note = f"top {k} of {min(rows, cols)} singular values (matrix-free ARPACK)"
            device = "cpu"
        else:
            if k is not None:
                note = (f"top-k {k} >= min dimension - 1 of the {rows} x {cols} operator: "
                        "computed all values densely")
            values = self._dense(layer, request, device)
        return Spectrum(
            values=values, kind="operator", backend=self.name, exact=True,
            boundary=_boundary(layer, request), params=request.params(),
            seconds=time.perf_counter() - start, device="cuda" if device == "cuda" else "cpu",
            note=note, complete=not partial, lower_bound=lower, upper_bound=upper,
        )

    def _dense(self, layer: Layer, request: Request, device: str) -> np.ndarray:
        # A grouped conv is block diagonal (up to a permutation of rows and columns): its
        # singular values are the union of the groups' own, at a fraction of the cost.
        values = [self._dense_block(block, request, device) for block in group_blocks(layer)]
        return np.sort(np.concatenate(values))[::-1]

    def _dense_block(self, layer: Layer, request: Request, device: str) -> np.ndarray:
        if not layer.is_conv and device == "cpu" and self._torch_device is None:
            # A weight matrix (checkpoints: float32 by default): the Gram route, no copy.
            return matrix_singular_values(layer.weight, request.precision)[0]
        matrix = dense_operator(layer, request.boundary)
        if request.precision == "float32":
            matrix = matrix.astype(np.float32)
        if device == "cpu" and self._torch_device is None:
            import scipy.linalg

            return scipy.linalg.svdvals(matrix, overwrite_a=True, check_finite=False)
        import torch

        tensor = torch.as_tensor(matrix, device=device)
        return torch.linalg.svdvals(tensor).cpu().numpy().astype(np.float64)

    def _zero_padded_top_k(self, layer: Layer, k: int
                           ) -> tuple[np.ndarray, float, float, str]:
        """(values, lower bound, upper bound of sigma_max, note) from ``top_singular_values``.

        What is stored is what it proves: each value within ``TOP_K_TOLERANCE`` (relative) of a
        singular value of A (residual check in float64), sigma_max(A) within [lower, upper]
        (the first value's own Rayleigh quotient and the circulant embedding's norm). That the
        values are the k largest, in the gap between a value and ``upper``, is Lanczos's answer
        (as ARPACK's is), proven where the bracket closes. A value the check cannot certify
        after the float64 refinement is an error, never stored."""
        # Spare values for k > 1: a Lanczos run can miss a copy of a repeated value (see
        # ``_top_k``); the top value alone needs none.
        wanted = k + SPARE_VALUES if k > 1 else 1
        found = top_singular_values(conv_geometry(layer), wanted, tol=TOP_K_TOLERANCE)
        values = found.values[:k]
        worst = float(np.max(found.errors[:k]))
        if not worst <= TOP_K_TOLERANCE or values.size < min(k, found.values.size):
            raise BackendError(
                f"layer {layer.name}: the top-{k} Lanczos run ended with a certified error "
                f"of {worst:.1e}, above {TOP_K_TOLERANCE:.0e}",
                "report it with the model; --backend toeplitz gives certified bounds",
            )
        bracket = f"sigma_max in [{found.lower_bound:.10g}, {found.upper_bound:.10g}]"
        note = (f"top {k} of {min(conv_geometry(layer).shape)} singular values (matrix-free Lanczos, "
                f"each within {worst:.0e} of a singular value; {bracket})")
        return values, found.lower_bound, found.upper_bound, note

    def _top_k(self, layer: Layer, request: Request, k: int) -> np.ndarray:
        import scipy.sparse.linalg

        dtype = np.float32 if request.precision == "float32" else np.float64
        if layer.is_conv:
            apply = ConvApply(layer, request.boundary, dtype=dtype)
            operator = scipy.sparse.linalg.LinearOperator(
                apply.shape, matvec=apply.matvec, rmatvec=apply.rmatvec, dtype=dtype
            )
        else:
            operator = np.asarray(layer.weight, dtype=dtype)
        # A fixed start vector keeps results reproducible; tol=0 means machine precision. A
        # wider Krylov space than scipy's default (2k+1, at least 20) cut the products needed
        # by ~15% on random 3x3 convs, whose top values are tightly clustered.
        # Two values more than asked: a Lanczos method started from one vector can miss a copy
        # of a repeated singular value (a dilated conv's sub-grids repeat every value); the
        # extra Ritz values, and the rounding that seeds them, catch the copy (found by the
        # conformance suite: top-2 of a dilation-2 conv gave sigma_1 once, then sigma_5).
        wanted = k
        k = min(k + SPARE_VALUES, min(operator.shape) - 2)
        ncv = min(min(operator.shape) - 1, max(2 * k + 1, 32))
        # One BLAS thread: NumPy's products and ARPACK's SciPy BLAS calls alternate, and their
        # two thread pools fought over the cores (2.6x slower on 2 cores; engine/parallel.py).
        with one_blas_thread():
            values = scipy.sparse.linalg.svds(
                operator, k=k, ncv=ncv, tol=0, return_singular_vectors=False,
                rng=np.random.default_rng(0),
            )
        return np.sort(np.asarray(values, dtype=np.float64))[::-1][:wanted]

    def memory(self, layer: Layer, request: Request) -> int | None:
        """The dense path: one group block's sparse and dense float64 matrix (plus its float32
        or torch copy); the top-k path: ARPACK's vectors and the matrix-free products."""
        from specprof.engine.circulant import half_grid_size
        from specprof.engine.limits import conv_products_bytes, lanczos_bytes
        from specprof.engine.operator import conv_geometry, embedding_grid

        rows, cols = operator_shape(layer, request.boundary)
        itemsize = 4 if request.precision == "float32" else 8
        k = request.top_k
        if k is not None and k < min(rows, cols) - 1:
            ncv = min(min(rows, cols) - 1, max(2 * (k + SPARE_VALUES) + 1, 32))
            vectors = lanczos_bytes(min(rows, cols), ncv)
            if not layer.is_conv:
                return vectors + (8 + itemsize) * rows * cols
            geometry = conv_geometry(layer, request.boundary)
            taps = int(np.prod(geometry.kernel))
            products = conv_products_bytes(rows, cols, int(np.prod(geometry.out)), taps,
                                           geometry.c_in)
            if request.boundary != "zeros":
                return 2 * vectors + products
            # Zero padding (engine/zero_padded.py): a fast and an exact product, and the
            # circulant upper bound's symbols on the embedding grid.
            frequencies = half_grid_size(embedding_grid(geometry))
            channels = geometry.c_out * geometry.c_in // geometry.groups * int(
                np.prod(geometry.strides))
            return 2 * vectors + 2 * products + 3 * 16 * frequencies * channels
        block = group_blocks(layer)[0] if layer.is_conv else layer
        block_rows, block_cols = operator_shape(block, request.boundary)
        dense = block_rows * block_cols
        taps = int(np.prod(layer.weight.shape[1:])) if layer.is_conv else 0
        sparse = 3 * 16 * block_rows * taps  # coo triplets, then csr, of every tap
        copy = itemsize if (request.precision == "float32" or self._torch_device is not None
                            or self._device(request) == "cuda") else 0
        # LAPACK copies a C-ordered matrix to Fortran order: two float64 matrices at once.
        return (16 + copy) * dense + sparse + 8 * 4 * (block_rows + block_cols)


@hookimpl
def specprof_register_backends() -> list[type]:
    return [ExactBackend]
