"""Conformance suites for plugin authors: ``BackendConformance``, ``ImporterConformance``,
``AnalyzerConformance``. specprof's own tests run the same classes on every built-in.

Subclass one in a test module, name the subclass ``Test...``, and set the class under test::

    from specprof.testing import BackendConformance
    from mypackage import MyBackend

    class TestMyBackend(BackendConformance):
        backend_class = MyBackend

pytest then runs every ``test_*`` method on a zoo of small layers (Conv 1D/2D/3D with
stride, padding, dilation, groups, ConvTranspose, Gemm, MatMul). The module is also a pytest
plugin (``pytest_plugins = ("specprof.testing",)`` in a ``conftest.py``) that adds the
fixtures ``specprof_zoo`` and ``specprof_store`` (a fresh SQLite store in ``tmp_path``).

What the backend suite checks:
- its declaration: name, kind, exact flag, devices; ``available()`` never raises; where it
  supports a layer its ``cost`` is None or a finite number of seconds; it is registered
  under its name (installed through the ``specprof`` entry-point group) unless the subclass
  sets ``registered = False``;
- refusals come with a reason;
- exact operator backends give the oracle's singular values within ``rtol`` of sigma_max; a
  partial answer (``Spectrum(..., complete=False)``, e.g. a top-k or norm-only backend) is
  checked against the oracle's largest values, and its sigma_min and stable rank must be
  NaN, never a wrong number;
- approximate operator backends give the right number of values (unless partial), and any
  bounds they report bracket the true spectral norm;
- filter backends give the SVD of the unfolded weight ``reshape(W, c_out, -1)``;
- with ``Request(top_k=k)`` every supported answer holds at least the top ``k`` values right.

The default oracle is the dense matrix of ``specprof.engine.operator.dense_operator``
(independent of every backend; specprof's own tests override ``oracle_matrix`` with one that
pushes the identity basis through torch's convolutions).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pytest

from specprof.engine.base import (
    AnalysisContext,
    Analyzer,
    Backend,
    Importer,
    ImportOptions,
    PluginObject,
)
from specprof.engine.errors import SpecprofError
from specprof.engine.types import Boundary, Layer, Request, Spectrum

if TYPE_CHECKING:
    import onnx

    from specprof.engine.store import Store

__all__ = ["ZOO", "AnalyzerConformance", "BackendConformance", "ImporterConformance",
           "check_registered", "conformance_zoo", "small_onnx_model"]


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


ZOO = conformance_zoo()
_IDS = [layer.name for layer in ZOO]


def small_onnx_model(seed: int = 0) -> onnx.ModelProto:
    """A two-layer ONNX model (Conv 3->4 3x3 on 6x6, Relu, Flatten, Gemm 144->5) to profile."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv_w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    gemm_w = numpy_helper.from_array(rng.standard_normal((5, 144)).astype(np.float32), "g")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "g"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 3, 6, 6])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 5])], initializer=[conv_w, gemm_w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def check_registered(kind: str, plugin_class: type[PluginObject], registered: bool) -> None:
    """Assert that the shared registry holds ``plugin_class`` under its name, as a ``kind``.

    Skips when ``registered`` is False (a class not installed as a plugin)."""
    if not registered:
        pytest.skip("registered = False: the class is not installed as a plugin")
    from specprof.engine.plugins import get_registry

    registry = get_registry()
    found = registry.table(kind).get(plugin_class.name)
    assert found is not None, (
        f"no {kind} '{plugin_class.name}' registered: declare it in the 'specprof' "
        "entry-point group and install the package (or set registered = False)")
    origin = registry.origins.get(f"{kind}:{plugin_class.name}")
    assert found.__qualname__ == plugin_class.__qualname__, (
        f"'{plugin_class.name}' is registered by {origin}, as {found.__qualname__}")


# --- backends -------------------------------------------------------------------------------------


class BackendConformance:
    """Mix-in test class: set ``backend_class``; override the class attributes to adapt."""

    backend_class: ClassVar[type[Backend]]
    boundaries: ClassVar[tuple[Boundary, ...]] = ("zeros", "circular")
    rtol: ClassVar[float] = 1e-10
    """Tolerance, relative to sigma_max, of an exact backend's values."""
    min_supported: ClassVar[int] = 1
    """How many (zoo layer, boundary) pairs the backend must support."""
    registered: ClassVar[bool] = True
    """Check that ``get_registry()`` finds the backend under its name (set False for a class
    that is not installed as a plugin)."""
    top_k: ClassVar[int] = 2
    """k of the top-k check."""

    # --- hooks a subclass may override ------------------------------------------------------

    def make_backend(self) -> Backend:
        return self.backend_class()

    def request(self, boundary: Boundary, top_k: int | None = None) -> Request:
        return Request(boundary=boundary, top_k=top_k)

    def oracle_matrix(self, layer: Layer, boundary: Boundary) -> np.ndarray:
        """The dense matrix of ``layer`` (one input vector to one output vector)."""
        if not layer.is_conv:
            return np.asarray(layer.weight, dtype=np.float64)
        from specprof.engine.operator import dense_operator

        return dense_operator(layer, boundary)

    # --- helpers -------------------------------------------------------------------------------

    def _truth(self, layer: Layer, boundary: Boundary) -> np.ndarray:
        return np.linalg.svd(self.oracle_matrix(layer, boundary), compute_uv=False)

    def _answers(self, layer: Layer, top_k: int | None = None
                 ) -> Iterator[tuple[Boundary, Backend, Spectrum]]:
        backend = self.make_backend()
        for boundary in self.boundaries:
            request = self.request(boundary, top_k)
            if backend.supports(layer, request):
                yield boundary, backend, backend.compute(layer, request)

    # --- declaration and registration ------------------------------------------------------------

    def test_available_never_raises(self) -> None:
        support = self.backend_class.available()
        assert isinstance(support.ok, bool)
        assert support.ok or support.reason, "an unavailable backend must say why"

    def test_declares_its_capabilities(self) -> None:
        cls = self.backend_class
        assert isinstance(cls.name, str) and cls.name.strip(), "name: a non-empty string"
        assert cls.kind in ("operator", "filter"), "kind: 'operator' or 'filter'"
        assert isinstance(cls.exact, bool), "exact: True or False"
        assert cls.devices and all(isinstance(d, str) for d in cls.devices)
        assert isinstance(cls.description, str)

    def test_is_registered(self) -> None:
        check_registered("backend", self.backend_class, self.registered)

    @pytest.mark.parametrize("layer", ZOO, ids=_IDS)
    def test_cost_is_an_estimate_in_seconds(self, layer: Layer) -> None:
        backend = self.make_backend()
        for boundary in self.boundaries:
            request = self.request(boundary)
            if not backend.supports(layer, request):
                continue
            cost = backend.cost(layer, request)
            assert cost is None or (isinstance(cost, int | float) and math.isfinite(cost)
                                    and cost >= 0), f"cost {cost!r} on {layer.name}"

    def test_supports_enough_of_the_zoo(self) -> None:
        backend = self.make_backend()
        supported = sum(1 for layer in ZOO for boundary in self.boundaries
                        if backend.supports(layer, self.request(boundary)))
        assert supported >= self.min_supported

    @pytest.mark.parametrize("layer", ZOO, ids=_IDS)
    def test_refusals_give_a_reason(self, layer: Layer) -> None:
        backend = self.make_backend()
        for boundary in self.boundaries:
            support = backend.supports(layer, self.request(boundary))
            assert support.ok or support.reason.strip(), f"no reason for refusing {layer.name}"

    # --- values --------------------------------------------------------------------------------

    @pytest.mark.parametrize("layer", ZOO, ids=_IDS)
    def test_spectrum_matches_the_oracle(self, layer: Layer) -> None:
        for boundary, backend, spectrum in self._answers(layer):
            self._check_well_formed(spectrum, backend)
            if backend.kind == "filter":
                self._check_filter(layer, spectrum)
            elif backend.exact:
                self._check_exact(layer, boundary, spectrum)
            else:
                self._check_approximation(layer, boundary, spectrum)

    @pytest.mark.parametrize("layer", ZOO, ids=_IDS)
    def test_top_k_holds_the_largest_values(self, layer: Layer) -> None:
        for boundary, backend, spectrum in self._answers(layer, self.top_k):
            self._check_well_formed(spectrum, backend)
            if backend.kind != "operator" or not backend.exact:
                continue
            truth = self._truth(layer, boundary)
            assert spectrum.expanded().size >= min(self.top_k, truth.size), (
                f"{layer.name}: top-{self.top_k} asked, {spectrum.expanded().size} values given")
            self._check_exact(layer, boundary, spectrum, truth)

    def _check_well_formed(self, spectrum: Spectrum, backend: Backend) -> None:
        assert spectrum.kind == backend.kind
        assert spectrum.backend == backend.name
        values = spectrum.values
        assert values.size > 0, "a spectrum holds at least one value"
        assert np.all(np.isfinite(values)) and np.all(values >= -1e-12)
        assert np.all(np.diff(values) <= 1e-12), "values must be descending"
        if not spectrum.complete:
            assert math.isnan(spectrum.sigma_min) and math.isnan(spectrum.stable_rank), \
                "a partial spectrum must not claim sigma_min or a stable rank"

    def _check_exact(self, layer: Layer, boundary: Boundary, spectrum: Spectrum,
                     truth: np.ndarray | None = None) -> None:
        truth = self._truth(layer, boundary) if truth is None else truth
        values = spectrum.expanded()
        if spectrum.complete:
            assert values.size == truth.size, (values.size, truth.size)
        else:
            assert values.size <= truth.size, (values.size, truth.size)
            truth = truth[:values.size]
        np.testing.assert_allclose(values, truth, rtol=0, atol=self.rtol * truth[0],
                                   err_msg=f"{layer.name} ({boundary})")

    def _check_approximation(self, layer: Layer, boundary: Boundary, spectrum: Spectrum) -> None:
        truth = self._truth(layer, boundary)
        if spectrum.complete:
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
        truth = np.linalg.svd(weight.reshape(weight.shape[0], -1), compute_uv=False)
        values = spectrum.expanded()
        if not spectrum.complete:
            truth = truth[:values.size]
        np.testing.assert_allclose(values, truth, rtol=0, atol=1e-10 * truth[0])
        if spectrum.left_vectors is not None:
            u = spectrum.left_vectors
            np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-8)


# --- importers ------------------------------------------------------------------------------------


class ImporterConformance:
    """Mix-in test class for importers: set ``importer_class`` and implement ``sample``."""

    importer_class: ClassVar[type[Importer]]
    options: ClassVar[ImportOptions] = ImportOptions()
    """What ``load`` gets for the sample (e.g. an input shape)."""
    min_layers: ClassVar[int] = 1
    """How many linear layers specprof must find in the sample once imported."""
    registered: ClassVar[bool] = True

    def sample(self, tmp_path: Path) -> Path | Any:
        """A small model this importer reads: a file written under ``tmp_path``, or an object."""
        raise NotImplementedError("return a small model file (or object) for the importer")

    def make_importer(self) -> Importer:
        return self.importer_class()

    def test_declares_itself(self) -> None:
        cls = self.importer_class
        assert isinstance(cls.name, str) and cls.name.strip()
        assert isinstance(cls.framework, str) and cls.framework.strip()
        assert all(s.startswith(".") for s in cls.suffixes), "suffixes start with a dot"
        support = cls.available()
        assert support.ok or support.reason, "an unavailable importer must say why"

    def test_is_registered(self) -> None:
        check_registered("importer", self.importer_class, self.registered)

    def test_sample_becomes_valid_onnx_with_layers(self, tmp_path: Path) -> None:
        import onnx

        from specprof.engine.loading import load_model

        if not self.importer_class.available():
            pytest.skip(f"not installed here: {self.importer_class.available().reason}")
        source = self.sample(tmp_path)
        proto = self.make_importer().load(source, self.options)
        assert isinstance(proto, onnx.ModelProto)
        onnx.checker.check_model(proto)
        path = tmp_path / "converted.onnx"
        onnx.save(proto, path)
        loaded = load_model(path, format="onnx", input_shape=self.options.input_shape)
        assert len(loaded.layers) >= self.min_layers

    def test_garbage_is_refused_with_a_clear_error(self, tmp_path: Path) -> None:
        if not self.importer_class.available():
            pytest.skip(f"not installed here: {self.importer_class.available().reason}")
        suffix = self.importer_class.suffixes[0] if self.importer_class.suffixes else ".bin"
        garbage = tmp_path / f"garbage{suffix}"
        garbage.write_bytes(b"\x00not a model\xff" * 16)
        importer = self.make_importer()
        assert importer.sniff(garbage, garbage.read_bytes()[:64]) in (True, False)
        with pytest.raises(SpecprofError) as error:
            importer.load(garbage, self.options)
        assert "\n" not in error.value.one_line()


# --- analyzers ------------------------------------------------------------------------------------


class AnalyzerConformance:
    """Mix-in test class for analyzers: set ``analyzer_class``.

    The analyzer runs on a stored run of ``small_onnx_model`` profiled with ``backends``
    into a fresh SQLite store, with ``options`` as its context options.
    """

    analyzer_class: ClassVar[type[Analyzer]]
    backends: ClassVar[tuple[str, ...]] = ("exact",)
    options: ClassVar[dict[str, Any]] = {}
    registered: ClassVar[bool] = True

    def make_analyzer(self) -> Analyzer:
        return self.analyzer_class()

    def test_declares_itself(self) -> None:
        cls = self.analyzer_class
        assert isinstance(cls.name, str) and cls.name.strip()
        support = cls.available()
        assert support.ok or support.reason, "an unavailable analyzer must say why"

    def test_is_registered(self) -> None:
        check_registered("analyzer", self.analyzer_class, self.registered)

    def test_analyzes_a_stored_run(self, tmp_path: Path) -> None:
        import pandas as pd

        with _profiled_store(tmp_path, self.backends) as (store, run_id):
            frame = self.make_analyzer().analyze(
                AnalysisContext(store=store, options=dict(self.options)), run_id)
        assert isinstance(frame, pd.DataFrame)
        assert len(frame) > 0

    def test_unknown_run_is_a_clear_error(self, tmp_path: Path) -> None:
        with _profiled_store(tmp_path, self.backends) as (store, run_id), \
                pytest.raises(SpecprofError):
            self.make_analyzer().analyze(
                AnalysisContext(store=store, options=dict(self.options)), run_id + 1000)


class _profiled_store:
    """A SQLite store in ``folder`` holding one run of ``small_onnx_model``."""

    def __init__(self, folder: Path, backends: tuple[str, ...]) -> None:
        self.folder, self.backends = folder, backends

    def __enter__(self) -> tuple[Store, int]:
        import onnx

        from specprof.engine.loading import load_model
        from specprof.engine.plugins import get_registry
        from specprof.engine.profile import ProfileConfig, profile_model
        from specprof.engine.store import Store

        path = self.folder / "small.onnx"
        onnx.save(small_onnx_model(), path)
        registry = get_registry()
        model = load_model(path, registry=registry)
        self.store = Store.open(str(self.folder / "conformance.db"))
        result = profile_model(model, ProfileConfig(backends=self.backends), self.store,
                               registry)
        return self.store, result.run_id

    def __exit__(self, *_exc: object) -> None:
        self.store.close()


# --- pytest plugin --------------------------------------------------------------------------------


@pytest.fixture
def specprof_zoo() -> list[Layer]:
    """The conformance zoo: small layers covering every attribute a backend must get right."""
    return conformance_zoo()


@pytest.fixture
def specprof_store(tmp_path: Path) -> Iterator[Store]:
    """A fresh SQLite store in ``tmp_path``, closed after the test."""
    from specprof.engine.store import Store

    store = Store.open(str(tmp_path / "specprof.db"))
    try:
        yield store
    finally:
        store.close()
