"""DeepDataProfiler's filter SVD (Praggastis et al. 2022): the SVD of the unfolded weight.

A Conv weight (c_out, c_in/g, k...) is unfolded to the c_out x (c_in/g * prod(k)) matrix whose
row i holds everything output channel i reads; its left singular vectors ("SVD neurons") are
directions in output-channel space, onto which the analyzers project activations. This is a
property of the weight alone: no input size, no boundary. It is not the operator spectrum.
"""

from __future__ import annotations

import time
from typing import ClassVar

import numpy as np

from specprof.engine import hookimpl
from specprof.engine.base import Backend
from specprof.engine.errors import BackendError
from specprof.engine.types import Layer, Request, Spectrum, SpectrumKind, Support


def unfolded_weight(layer: Layer) -> np.ndarray:
    """The weight as the (c_out, fan_in) matrix whose rows are the output channels' filters.

    ConvTranspose weights (c_in, c_out/g, k...) are first put in Conv layout
    (c_out, c_in/g, k...), group by group, so rows are output channels here too.
    """
    weight = np.asarray(layer.weight, dtype=np.float64)
    if layer.op_type == "ConvTranspose":
        g = layer.groups
        c_in, cout_g = weight.shape[:2]
        grouped = weight.reshape(g, c_in // g, cout_g, -1)
        weight = np.swapaxes(grouped, 1, 2).reshape(g * cout_g, c_in // g, *layer.kernel_shape)
    return weight.reshape(weight.shape[0], -1)


class FilterBackend(Backend):
    """Singular values and left singular vectors of the unfolded weight."""

    name: ClassVar[str] = "filter"
    description: ClassVar[str] = (
        "filter SVD of the unfolded weight (DeepDataProfiler): values and left vectors"
    )
    kind: ClassVar[SpectrumKind] = "filter"
    exact: ClassVar[bool] = True

    def supports(self, layer: Layer, request: Request) -> Support:
        if request.device not in ("cpu", "auto"):
            return Support.no(f"the filter SVD runs on the CPU only, not {request.device}")
        return Support.yes("filter SVD needs only the weight")

    def compute(self, layer: Layer, request: Request) -> Spectrum:
        start = time.perf_counter()
        matrix = unfolded_weight(layer)
        if not np.isfinite(matrix).all():
            raise BackendError(
                f"layer {layer.name} has non-finite weights (NaN or Inf)",
                "check the model file or its training; the layer's SVD is undefined",
            )
        import scipy.linalg

        if request.keep_vectors:
            u, values, _ = scipy.linalg.svd(matrix, full_matrices=False, check_finite=False)
        else:
            u, values = None, scipy.linalg.svdvals(matrix, check_finite=False)
        return Spectrum(
            values=values, kind="filter", backend=self.name, exact=True, boundary=None,
            left_vectors=u, params={}, seconds=time.perf_counter() - start, device="cpu",
        )

    def memory(self, layer: Layer, request: Request) -> int | None:
        """The unfolded weight, its SVD's copy and work (LAPACK gesdd: ~5 min^2), and the
        singular vectors."""
        entries = int(layer.weight.size)
        side = int(layer.weight.shape[0])  # rows, or columns of a ConvTranspose's unfolding
        small = min(side, entries // max(side, 1))
        return 8 * (4 * entries + 7 * small * small + 2 * max(side, entries // max(side, 1)))


@hookimpl
def specprof_register_backends() -> list[type]:
    return [FilterBackend]
