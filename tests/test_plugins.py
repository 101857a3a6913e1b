"""Plugins: built-ins load like third-party ones, extra backends register and run, and
SPECPROF_DISABLED_PLUGINS turns plugins off."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from specprof.engine import hookimpl
from specprof.engine.base import Backend
from specprof.engine.errors import SpecprofError
from specprof.engine.plugins import DEFAULT_PLUGINS, Registry, get_plugin_manager
from specprof.engine.profile import ProfileConfig, profile_model
from specprof.engine.store import Store
from specprof.engine.types import Layer, LoadedModel, Request, Spectrum, Support


class FrobeniusOnly(Backend):
    """A toy third-party backend: reports only the Frobenius norm as one 'value'."""

    name: ClassVar[str] = "frobenius-only"
    kind: ClassVar[str] = "operator"  # type: ignore[misc]
    exact: ClassVar[bool] = False
    description: ClassVar[str] = "test plugin"
    calls: ClassVar[list[str]] = []

    def supports(self, layer: Layer, request: Request) -> Support:
        return Support.yes() if layer.op_type == "Gemm" else Support.no("Gemm only")

    def compute(self, layer: Layer, request: Request) -> Spectrum:
        FrobeniusOnly.calls.append(layer.name)
        return Spectrum(values=[np.linalg.norm(layer.weight)], kind="operator",
                        backend=self.name, exact=False)


class ToyPlugin:
    @hookimpl
    def specprof_register_backends(self) -> list[type]:
        return [FrobeniusOnly]


def _model() -> LoadedModel:
    rng = np.random.default_rng(0)
    layers = (
        Layer(name="fc", op_type="Gemm", weight=rng.normal(size=(4, 6)), index=0,
              input_shape=(6,)),
        Layer(name="conv", op_type="Conv", weight=rng.normal(size=(2, 1, 3, 3)), index=1,
              pads=(1, 1, 1, 1), input_shape=(1, 5, 5)),
    )
    return LoadedModel(name="toy", format="onnx", framework="onnx", opset=18, layers=layers)


def test_builtins_are_registered_from_default_plugins() -> None:
    pm = get_plugin_manager()
    names = {pm.get_name(plugin) for plugin in pm.get_plugins()}
    assert set(DEFAULT_PLUGINS) <= names
    registry = Registry.from_manager(pm)
    assert {"exact", "filter"} <= set(registry.backends)
    assert {"onnx", "torch"} <= set(registry.importers)


def test_an_extra_backend_registered_through_the_plugin_manager_is_used(tmp_path: Path) -> None:
    FrobeniusOnly.calls.clear()
    pm = get_plugin_manager()
    pm.register(ToyPlugin(), name="toy-plugin")
    registry = Registry.from_manager(pm)
    assert registry.origins["Backend:frobenius-only"] == "toy-plugin"
    model = _model()
    with Store.open(f"sqlite:///{tmp_path}/db.sqlite") as store:
        result = profile_model(model, ProfileConfig(backends=("frobenius-only",)), store, registry)
        stored = store.query(backend="frobenius-only")
    assert FrobeniusOnly.calls == ["fc"]
    statuses = {o.layer.name: o.status for o in result.outcomes}
    assert statuses == {"fc": "ok", "conv": "skipped"}
    ok = stored[stored.status == "ok"]
    assert ok.sigma_max.tolist() == pytest.approx([np.linalg.norm(model.layers[0].weight)])
    assert stored[stored.status == "skipped"].message.tolist() == ["Gemm only"]


def test_disabled_plugins_are_not_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECPROF_DISABLED_PLUGINS", "specprof.plugins.backends.filter")
    registry = Registry.from_manager()
    assert "filter" not in registry.backends and "exact" in registry.backends
    with pytest.raises(SpecprofError, match="unknown backend 'filter'"):
        registry.backend("filter")


def test_a_plugin_registering_a_wrong_type_is_named() -> None:
    class Broken:
        @hookimpl
        def specprof_register_backends(self) -> list[object]:
            return [object]

    pm = get_plugin_manager()
    pm.register(Broken(), name="broken-plugin")
    with pytest.raises(SpecprofError, match="broken-plugin"):
        Registry.from_manager(pm)


def _fake_distribution(root: Path) -> None:
    """A plugin package 'installed' by its metadata alone, the way pip would leave it."""
    (root / "toy_specprof_plugin.py").write_text(textwrap.dedent('''
        import numpy as np
        from specprof import Backend, Spectrum, hookimpl

        class Trace(Backend):
            name = "trace-toy"
            kind = "operator"
            exact = False
            description = "entry-point plugin"

            def compute(self, layer, request):
                return Spectrum(values=[abs(np.trace(layer.weight))], kind="operator",
                                backend=self.name, exact=False)

        @hookimpl
        def specprof_register_backends():
            return [Trace]
    '''))
    info = root / "toy_specprof_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-specprof-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[specprof]\ntoy = toy_specprof_plugin\n")


def test_entry_point_plugins_are_found_and_can_be_disabled(tmp_path: Path) -> None:
    _fake_distribution(tmp_path)
    env_base = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    listing = subprocess.run([sys.executable, "-m", "specprof", "backends", "--output-format",
                              "json"], capture_output=True, text=True, env=env_base, check=False)
    assert listing.returncode == 0, listing.stderr
    assert '"trace-toy"' in listing.stdout and '"toy"' in listing.stdout
    disabled = subprocess.run([sys.executable, "-m", "specprof", "backends", "--output-format",
                               "json"], capture_output=True, text=True, check=False,
                              env={**env_base, "SPECPROF_DISABLED_PLUGINS": "toy"})
    assert disabled.returncode == 0, disabled.stderr
    assert "trace-toy" not in disabled.stdout and '"exact"' in disabled.stdout
