"""The ground truth: singular values of a layer's true matrix.

Small layers: build the dense matrix (``specprof.engine.operator``) and take all singular values
with LAPACK (``scipy.linalg.svdvals``), or with ``torch.linalg.svdvals`` on a CUDA device.
Any size with ``--top-k K``: the K largest values by ARPACK (``scipy.sparse.linalg.svds``) on a
matrix-free ``LinearOperator`` whose products are the convolution and its adjoint.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any, ClassVar

import numpy as np

from specprof.engine import hookimpl
from specprof.engine.base import Backend
from specprof.engine.costs import dense_svd_seconds, matrix_free_top_k_seconds
from specprof.engine.errors import BackendError, SpecprofError
from specprof.engine.operator import ConvApply, dense_operator, group_blocks, operator_shape
from specprof.engine.parallel import one_blas_thread
from specprof.engine.types import Layer, Request, Spectrum, SpectrumKind, Support

MAX_DENSE_BYTES = 2**30
"""Largest dense matrix the exact backend builds (1 GiB)."""
SPARE_VALUES = 2
"""Values the matrix-free top-k solve computes beyond the k asked for (see ``_top_k``)."""

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
        block_rows, block_cols = operator_shape(group_blocks(layer)[0], request.boundary)
        refusal = self._dense_refusal(block_rows, block_cols, request)
        if refusal:
            return Support.no(refusal)
        if not layer.is_conv:
            return Support.yes("matrix layer: dense SVD of the weight")
        blocks = f" in {layer.groups} diagonal blocks" if layer.groups > 1 else ""
        return Support.yes(f"small enough for the dense SVD ({rows} x {cols}{blocks})")

    def cost(self, layer: Layer, request: Request) -> float | None:
        rows, cols = operator_shape(layer, request.boundary)
        k = request.top_k
        if k is not None and k < min(rows, cols) - 1:
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
        if partial:
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
            note=note, complete=not partial,
        )

    def _dense(self, layer: Layer, request: Request, device: str) -> np.ndarray:
        # A grouped conv is block diagonal (up to a permutation of rows and columns): its
        # singular values are the union of the groups' own, at a fraction of the cost.
        values = [self._dense_block(block, request, device) for block in group_blocks(layer)]
        return np.sort(np.concatenate(values))[::-1]

    def _dense_block(self, layer: Layer, request: Request, device: str) -> np.ndarray:
        matrix = dense_operator(layer, request.boundary)
        if request.precision == "float32":
            matrix = matrix.astype(np.float32)
        if device == "cpu" and self._torch_device is None:
            import scipy.linalg

            return scipy.linalg.svdvals(matrix, overwrite_a=True, check_finite=False)
        import torch

        tensor = torch.as_tensor(matrix, device=device)
        return torch.linalg.svdvals(tensor).cpu().numpy().astype(np.float64)

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


@hookimpl
def specprof_register_backends() -> list[type]:
    return [ExactBackend]
