"""The package imports from an editable install and from a wheel, and imports nothing heavy."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "onnxruntime", "hypernetx", "tensorflow", "jax")


def _python(code: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, **kwargs)  # type: ignore[call-overload]


def test_import_is_light_even_with_plugins_loaded() -> None:
    code = (
        "import sys, specprof\n"
        "from specprof.engine.plugins import Registry\n"
        "import specprof.engine.api, specprof.engine.cli\n"
        "registry = Registry.from_manager()\n"
        "assert registry.backends and registry.importers\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_editable_install_maps_the_top_level_folders() -> None:
    import specprof.engine
    import specprof.plugins
    import specprof.schemas

    assert Path(specprof.engine.__file__).parent == ROOT / "engine"
    assert Path(specprof.plugins.__file__).parent == ROOT / "plugins"
    assert specprof.schemas.load_schema("query-results")["type"] == "array"


@pytest.mark.slow
def test_wheel_contains_and_imports_every_package(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("specprof-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("specprof/__init__.py", "specprof/engine/cli.py",
                     "specprof/plugins/backends/exact.py", "specprof/migrations/env.py",
                     "specprof/schemas/query-results.schema.json"):
        assert expected in names
    assert any(n.startswith("specprof/migrations/versions/") and n.endswith(".py")
               and "__init__" not in n for n in names)
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    code = (
        "import specprof, specprof.engine.store, specprof.plugins.backends.exact\n"
        "from specprof.schemas import load_schema\n"
        "load_schema('profile-config')\n"
        "print(specprof.__file__)\n"
    )
    result = _python(code, env={"PYTHONPATH": str(unpacked), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(unpacked))
