"""What a base install (``pip install specprof``, no extras) can do: profile an ONNX model,
export the run and import it again, with every extra's module made unimportable."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import onnx

from specprof.testing import small_onnx_model

ROOT = Path(__file__).resolve().parents[1]
EXTRA_MODULES = ("torch", "onnxscript", "psycopg", "tensorflow", "tf2onnx", "jax", "jaxlib",
                 "jax2onnx", "sklearn", "skl2onnx", "matplotlib", "pyarrow", "hypernetx",
                 "onnxruntime", "PIL", "pytest")
"""Modules only the extras (and dev) install."""


def test_the_base_dependencies_cover_import_and_export() -> None:
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(requirement.startswith("jsonschema") for requirement in base)


def test_export_then_import_on_a_base_install(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in EXTRA_MODULES))
    model = tmp_path / "small.onnx"
    onnx.save(small_onnx_model(), model)
    source, target = str(tmp_path / "a.db"), str(tmp_path / "b.db")

    def specprof(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "specprof", *args], capture_output=True,
                              text=True, check=False, env={"PYTHONPATH": str(blocker),
                                                           "PATH": "/usr/bin:/bin",
                                                           "HOME": str(tmp_path)})

    profiled = specprof("profile", str(model), "--db", source, "--output-format", "json")
    assert profiled.returncode == 0, profiled.stderr
    exported = specprof("export", "--run", "1", "--db", source, "-o", str(tmp_path / "r.json"))
    assert exported.returncode == 0, exported.stderr
    imported = specprof("import", str(tmp_path / "r.json"), "--db", target)
    assert imported.returncode == 0, imported.stderr
    assert "imported as run 1" in imported.stdout
    rows = specprof("query", "--db", target, "--format", "json")
    assert rows.returncode == 0, rows.stderr
    before = {r["layer"]: r["sigma_max"] for r in json.loads(profiled.stdout)}
    after = {r["layer"]: r["sigma_max"] for r in json.loads(rows.stdout)}
    assert after == before
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "specprof-run", "version": 1}')
    refused = specprof("import", str(broken), "--db", target)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
