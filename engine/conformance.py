"""``BackendConformance``: the accuracy checks every backend must pass, for third parties too.

Subclass it in a test module, name the subclass ``Test...``, and set ``backend_class``::

    from specprof.engine.conformance import BackendConformance
    from mypackage import MyBackend

    class TestMyBackend(BackendConformance):
        backend_class = MyBackend

pytest then runs every ``test_*`` method below on a zoo of small layers (Conv 1D/2D/3D with
stride, padding, dilation, groups, ConvTranspose, Gemm). Layers the backend says it does not
support are checked only for a reason; the others are compared against an oracle:
- exact operator backends: all singular values within ``rtol`` of the oracle matrix's;
- approximate operator backends: the right number of values, and any bounds they report
  bracket the true spectral norm;
- filter backends: the SVD of the unfolded weight ``reshape(W, c_out, -1)``.

The default oracle is the dense matrix from ``specprof.engine.operator`` (independent of any
backend but ``exact``, which is built on it: specprof's own tests override ``oracle_matrix``
with one that pushes the identity basis through torch's convolutions).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

from specprof.engine.base import Backend
from specprof.engine.types import Boundary, Layer, Request, Spectrum


def _conv(name: str, c_out: int, c_in: int, kernel: tuple[int, ...], spatial: tuple[int, ...],
          rng: np.random.Generator, *, stride: int = 1, pad: int = 0, dilation: int = 1,
          groups: int = 1, transpose: bool = False, output_padding: int = 0) -> Layer:
    d = len(kernel)
    shape = (c_in, c_out // groups, *kernel) if transpose else (c_out, c_in // groups, *kernel)
    return Layer(name=name, op_type="ConvTranspose" if transpose else "Conv",
                 weight=rng.standard_normal(shape), strides=(stride,) * d, pads=(pad,) * (2 * d),
                 dilations=(dilation,) * d, groups=groups,
                 output_padding=(output_padding,) * d, input_shape=(c_in, *spatial))


def conformance_zoo(seed: int = 0) -> list[Layer]:
    """Small layers covering every attribute a backend must get right."""
    rng = np.random.default_rng(seed)
    return [
        _conv("conv2d-same", 4, 3, (3, 3), (6, 6), rng, pad=1),
        _conv("conv2d-valid", 3, 2, (3, 3), (7, 5), rng),
        _conv("conv2d-stride2", 4, 3, (3, 3), (8, 8), rng, stride=2, pad=1),
        _conv("conv2d-dilated", 3, 3, (3, 3), (8, 8), rng, pad=2, dilation=2),
        _conv("conv2d-grouped", 6, 4, (3, 3), (6, 6), rng, pad=1, groups=2),
        _conv("conv2d-depthwise", 4, 4, (3, 3), (6, 6), rng, pad=1, groups=4),
        _conv("conv2d-1x1", 5, 3, (1, 1), (4, 4), rng),
        _conv("conv2d-big-kernel", 2, 2, (5, 5), (4, 4), rng, pad=2),
        _conv("conv1d", 3, 2, (3,), (10,), rng, pad=1),
        _conv("conv1d-stride2", 3, 2, (4,), (12,), rng, stride=2, pad=1),
        _conv("conv3d", 2, 2, (3, 3, 3), (4, 4, 4), rng, pad=1),
        _conv("convT2d", 3, 4, (3, 3), (4, 4), rng, pad=1, transpose=True),
        _conv("convT2d-stride2", 3, 4, (3, 3), (4, 4), rng, stride=2, pad=1, output_padding=1,
              transpose=True),
        Layer(name="gemm", op_type="Gemm", weight=rng.standard_normal((5, 8)), input_shape=(8,)),
        Layer(name="matmul", op_type="MatMul", weight=rng.standard_normal((7, 3)),
              input_shape=(3,)),
    ]


def _layer_ids(layers: list[Layer]) -> list[str]:
    return [layer.name for layer in layers]


ZOO = conformance_zoo()


class BackendConformance:
    """Mix-in test class: set ``backend_class``; override the class attributes to adapt."""

    backend_class: ClassVar[type[Backend]]
    boundaries: ClassVar[tuple[Boundary, ...]] = ("zeros", "circular")
    rtol: ClassVar[float] = 1e-10
    """Relative tolerance (to sigma_max) of an exact backend's values."""
    min_supported: ClassVar[int] = 1
    """How many zoo layers the backend must support at some boundary."""

    # --- hooks a subclass may override ------------------------------------------------------

    def make_backend(self) -> Backend:
        return self.backend_class()

    def request(self, boundary: Boundary) -> Request:
        return Request(boundary=boundary)

    def oracle_matrix(self, layer: Layer, boundary: Boundary) -> np.ndarray:
        """The dense matrix of ``layer`` (one input vector to one output vector)."""
        if not layer.is_conv:
            return np.asarray(layer.weight, dtype=np.float64)
        from specprof.engine.operator import dense_operator

        return dense_operator(layer, boundary)

    # --- helpers -------------------------------------------------------------------------------

    def _supported(self, layer: Layer, boundary: Boundary) -> tuple[Backend, Request] | None:
        backend, request = self.make_backend(), self.request(boundary)
        return (backend, request) if backend.supports(layer, request) else None

    def _truth(self, layer: Layer, boundary: Boundary) -> np.ndarray:
        return np.linalg.svd(self.oracle_matrix(layer, boundary), compute_uv=False)

    # --- the checks ----------------------------------------------------------------------------

    def test_available_never_raises(self) -> None:
        support = self.backend_class.available()
        assert isinstance(support.ok, bool)
        assert support.ok or support.reason, "an unavailable backend must say why"

    def test_declares_its_capabilities(self) -> None:
        cls = self.backend_class
        assert isinstance(cls.name, str) and cls.name
        assert cls.kind in ("operator", "filter")
        assert isinstance(cls.exact, bool)

    def test_supports_enough_of_the_zoo(self) -> None:
        supported = sum(1 for layer in ZOO for boundary in self.boundaries
                        if self._supported(layer, boundary))
        assert supported >= self.min_supported

    @pytest.mark.parametrize("layer", ZOO, ids=_layer_ids(ZOO))
    def test_refusals_give_a_reason(self, layer: Layer) -> None:
        backend = self.make_backend()
        for boundary in self.boundaries:
            support = backend.supports(layer, self.request(boundary))
            assert support.ok or support.reason.strip(), f"no reason for refusing {layer.name}"

    @pytest.mark.parametrize("layer", ZOO, ids=_layer_ids(ZOO))
    def test_spectrum_matches_the_oracle(self, layer: Layer) -> None:
        for boundary in self.boundaries:
            supported = self._supported(layer, boundary)
            if supported is None:
                continue
            backend, request = supported
            spectrum = backend.compute(layer, request)
            self._check_well_formed(spectrum, backend)
            if backend.kind == "filter":
                self._check_filter(layer, spectrum)
            elif backend.exact:
                self._check_exact(layer, boundary, spectrum)
            else:
                self._check_approximation(layer, boundary, spectrum)

    def _check_well_formed(self, spectrum: Spectrum, backend: Backend) -> None:
        assert spectrum.kind == backend.kind
        assert spectrum.backend == backend.name
        values = spectrum.values
        assert np.all(np.isfinite(values)) and np.all(values >= -1e-12)
        assert np.all(np.diff(values) <= 1e-12), "values must be descending"

    def _check_exact(self, layer: Layer, boundary: Boundary, spectrum: Spectrum) -> None:
        truth = self._truth(layer, boundary)
        values = spectrum.expanded()
        assert values.size == truth.size, (values.size, truth.size)
        np.testing.assert_allclose(values, truth, rtol=0, atol=self.rtol * truth[0],
                                   err_msg=f"{layer.name} ({boundary})")

    def _check_approximation(self, layer: Layer, boundary: Boundary, spectrum: Spectrum) -> None:
        truth = self._truth(layer, boundary)
        assert spectrum.n_values == truth.size, (spectrum.n_values, truth.size)
        top = truth[0]
        if spectrum.upper_bound is not None:
            assert spectrum.upper_bound >= top * (1 - 1e-10), (spectrum.upper_bound, top)
        if spectrum.lower_bound is not None:
            assert spectrum.lower_bound <= top * (1 + 1e-10), (spectrum.lower_bound, top)

    def _check_filter(self, layer: Layer, spectrum: Spectrum) -> None:
        weight = np.asarray(layer.weight, dtype=np.float64)
        if layer.op_type == "ConvTranspose":  # rows are output channels (zoo: one group)
            weight = np.moveaxis(weight, 1, 0)
        matrix = weight.reshape(weight.shape[0], -1)
        truth = np.linalg.svd(matrix, compute_uv=False)
        np.testing.assert_allclose(spectrum.expanded(), truth, rtol=0, atol=1e-10 * truth[0])
        if spectrum.left_vectors is not None:
            u = spectrum.left_vectors
            np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-8)
