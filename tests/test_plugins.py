"""Plugins: built-ins load like third-party ones, extra backends register and run, the
registry's contract (origins, clashes, overrides, broken plugins, one registry per process),
and SPECPROF_DISABLED_PLUGINS turns plugins off."""

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
from specprof.engine.plugins import (
    BUILT_IN,
    DEFAULT_PLUGINS,
    Registry,
    get_plugin_manager,
    get_registry,
)
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
    assert registry.origins["backend:frobenius-only"] == "toy-plugin"
    assert registry.origins["backend:exact"] == BUILT_IN
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


def test_a_plugin_registering_a_wrong_type_is_recorded_as_broken_not_raised() -> None:
    class Broken:
        @hookimpl
        def specprof_register_backends(self) -> list[object]:
            return [object]

    class Failing:
        @hookimpl
        def specprof_register_analyzers(self) -> list[object]:
            raise RuntimeError("boom")

    pm = get_plugin_manager()
    pm.register(Broken(), name="broken-plugin")
    pm.register(Failing(), name="failing-plugin")
    registry = Registry.from_manager(pm)
    broken = {b.name: b for b in registry.broken}
    assert set(broken) == {"broken-plugin", "failing-plugin"}
    assert "not a Backend subclass" in broken["broken-plugin"].error
    assert "boom" in broken["failing-plugin"].error
    assert "SPECPROF_DISABLED_PLUGINS=failing-plugin" in broken["failing-plugin"].hint
    assert "exact" in registry.backends  # the rest still loads


class Impostor(FrobeniusOnly):
    """A third-party backend that takes a built-in's name."""

    name: ClassVar[str] = "exact"


class ImpostorPlugin:
    @hookimpl
    def specprof_register_backends(self) -> list[type]:
        return [Impostor]


def test_a_name_clash_keeps_the_built_in_and_warns_naming_both(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPECPROF_OVERRIDE_PLUGINS", raising=False)
    pm = get_plugin_manager()
    pm.register(ImpostorPlugin(), name="impostor")
    registry = Registry.from_manager(pm)
    assert registry.backends["exact"] is not Impostor
    [warning] = [w for w in registry.warnings if "'exact'" in w]
    assert BUILT_IN in warning and "impostor" in warning
    assert "SPECPROF_OVERRIDE_PLUGINS=exact" in warning


def test_a_third_party_plugin_replaces_a_built_in_only_when_told_to(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECPROF_OVERRIDE_PLUGINS", "exact")
    pm = get_plugin_manager()
    pm.register(ImpostorPlugin(), name="impostor")
    registry = Registry.from_manager(pm)
    assert registry.backends["exact"] is Impostor
    assert registry.origins["backend:exact"] == "impostor"
    assert any("replaces the built-in" in w for w in registry.warnings)


def test_one_registry_per_process_rebuilt_when_the_settings_change(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPECPROF_DISABLED_PLUGINS", raising=False)
    first = get_registry()
    assert get_registry() is first
    assert first.available_backends() is first.available_backends()
    monkeypatch.setenv("SPECPROF_DISABLED_PLUGINS", "specprof.plugins.backends.filter")
    other = get_registry()
    assert other is not first and "filter" not in other.backends


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
    assert '"trace-toy"' in listing.stdout and '"toy-specprof-plugin 0.1"' in listing.stdout
    disabled = subprocess.run([sys.executable, "-m", "specprof", "backends", "--output-format",
                               "json"], capture_output=True, text=True, check=False,
                              env={**env_base, "SPECPROF_DISABLED_PLUGINS": "toy"})
    assert disabled.returncode == 0, disabled.stderr
    assert "trace-toy" not in disabled.stdout and '"exact"' in disabled.stdout


def test_a_broken_entry_point_never_stops_help_or_version(tmp_path: Path) -> None:
    (tmp_path / "bad_specprof_plugin.py").write_text("raise ImportError('no such thing')\n")
    info = tmp_path / "bad_specprof_plugin-2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bad-plugin\nVersion: 2.0\n")
    (info / "entry_points.txt").write_text("[specprof]\nbad = bad_specprof_plugin\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "specprof", *args], capture_output=True,
                              text=True, env=env, check=False)

    version = run("--version")
    assert version.returncode == 0 and "0." in version.stdout
    assert version.stderr == ""  # --version loads no plugin at all
    helped = run("--help")
    assert helped.returncode == 0 and "profile" in helped.stdout
    assert "plugin bad (bad-plugin 2.0) failed to load: ImportError: no such thing" in \
        " ".join(helped.stderr.split())
    listed = run("plugins", "--output-format", "json")
    assert listed.returncode == 0
    assert '"broken: ImportError: no such thing"' in listed.stdout
