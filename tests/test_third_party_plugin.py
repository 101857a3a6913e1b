"""The plugin package of docs/plugins.md, installed with pip as a user would, works end to end.

Every file of the package is read from the docs page (code blocks whose first line is
``# PATH``), so the page cannot drift from what is tested. specprof is installed from its
wheel and the plugin from its folder, with pip, into a fresh virtual environment that borrows
the test environment's other packages (numpy, pandas, pytest, mypy, ...) through a ``.pth``
line. There:
- ``specprof plugins`` lists the backend and the analyzer with the distribution as origin;
- ``specprof profile --top-k 1`` picks the plugin's backend on every layer (``auto``: it is the
  cheapest exact choice), and the values match the dense SVD;
- the plugin's own tests, ``specprof.testing`` conformance suites, pass;
- ``specprof analyze --analyzer norm-summary`` runs the analyzer; the plugin's command runs;
- ``mypy --strict`` is clean on the package, reading specprof's annotations (``py.typed``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from specprof.engine.loading import load_model
from specprof.engine.operator import dense_operator
from specprof.testing import small_onnx_model

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"
BLOCK = re.compile(r"```(?:python|toml)\n# (\S+)\n(.*?)```", re.S)

pytestmark = pytest.mark.slow


@dataclass
class Installed:
    python: Path
    package: Path
    model: Path
    db: str

    def run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.python), *args], capture_output=True, text=True,
                              check=False, cwd=cwd, env={"PATH": "/usr/bin:/bin",
                                                         "HOME": str(self.package.parent)})

    def specprof(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("-m", "specprof", *args)


def doc_files() -> dict[str, str]:
    """The files of the example package, by relative path, as docs/plugins.md gives them."""
    files = {path: f"# {path}\n{body}" for path, body in BLOCK.findall(DOC.read_text())}
    files["specprof_power/py.typed"] = ""
    return files


def _pip(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps",
                             "--no-build-isolation", "--quiet", "--disable-pip-version-check"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("third-party")
    package = root / "specprof-power"
    for relative, text in doc_files().items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")],
                   check=True)
    python = root / "venv" / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The test environment's packages, after the fresh site-packages (a plain path line: the
    # editable specprof there is not activated, so the installed wheel is the one imported).
    (site / "zz-test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _pip("wheel", "-w", str(root / "wheels"), str(ROOT))
    [wheel] = (root / "wheels").glob("specprof-*.whl")
    _pip("install", "--target", str(site), str(wheel), str(package))
    model = root / "small.onnx"
    onnx.save(small_onnx_model(), model)
    yield Installed(python, package, model, str(root / "runs.db"))


def test_the_docs_give_the_whole_package() -> None:
    assert {"pyproject.toml", "specprof_power/__init__.py", "specprof_power/command.py",
            "tests/test_conformance.py"} <= set(doc_files())


def test_specprof_and_the_plugin_are_the_installed_copies(installed: Installed) -> None:
    where = installed.run("-c", "import specprof, specprof_power; "
                                "print(specprof.__file__); print(specprof_power.__file__)")
    assert where.returncode == 0, where.stderr
    assert all("/venv/" in line for line in where.stdout.splitlines())


def test_listed_with_its_distribution_as_origin(installed: Installed) -> None:
    listing = installed.specprof("plugins", "--output-format", "json")
    assert listing.returncode == 0, listing.stderr
    rows = {(row["kind"], row["name"]): row for row in json.loads(listing.stdout)}
    assert rows[("backend", "power-iteration")]["from"] == "specprof-power 1.0"
    assert rows[("analyzer", "norm-summary")]["from"] == "specprof-power 1.0"
    assert rows[("backend", "exact")]["from"].endswith("(built-in)")
    assert listing.stderr == ""  # no clash, nothing broken


def test_auto_picks_it_where_it_is_the_cheapest_exact_choice(installed: Installed) -> None:
    profiled = installed.specprof("profile", str(installed.model), "--top-k", "1", "--db",
                                  installed.db, "--output-format", "json")
    assert profiled.returncode == 0, profiled.stderr
    rows = json.loads(profiled.stdout)
    # The conv: 80 products beat ARPACK's ~400 (for the small Gemm a dense SVD may be cheaper
    # still: whichever is, auto says so).
    assert rows[0]["backend"] == "power-iteration"
    assert all("top-1: cheapest exact" in row["reason"] for row in rows)
    loaded = load_model(installed.model)
    for row, layer in zip(rows, loaded.layers, strict=True):
        matrix = dense_operator(layer) if layer.is_conv else layer.weight
        truth = np.linalg.svd(matrix, compute_uv=False)[0]
        assert row["sigma_max"] == pytest.approx(truth, rel=1e-9)
        assert row["sigma_min"] is None  # a partial spectrum claims no sigma_min
    everything = installed.specprof("profile", str(installed.model), "--db", installed.db,
                                    "--output-format", "json")
    assert {row["backend"] for row in json.loads(everything.stdout)} == {"exact"}


def test_passes_the_conformance_suites(installed: Installed) -> None:
    tests = installed.run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests",
                          cwd=installed.package)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert re.search(r"\d+ passed", tests.stdout)
    assert "failed" not in tests.stdout


def test_its_analyzer_runs_through_specprof_analyze(installed: Installed) -> None:
    installed.specprof("profile", str(installed.model), "--top-k", "1", "--db", installed.db)
    analyzed = installed.specprof("analyze", "--run", "1", "--analyzer", "norm-summary", "--db",
                                  installed.db, "--format", "json")
    assert analyzed.returncode == 0, analyzed.stderr
    rows = json.loads(analyzed.stdout)
    assert len(rows) == 2 and rows[0]["backend"] == "power-iteration"
    assert "2 layers" in analyzed.stderr
    unknown = installed.specprof("analyze", "--run", "99", "--analyzer", "norm-summary",
                                 "--db", installed.db)
    assert unknown.returncode == 1 and "no run 99" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_its_command_runs(installed: Installed) -> None:
    result = installed.specprof("top-norm", str(installed.model), "--db", installed.db,
                                "--format", "json")
    assert result.returncode == 0, result.stderr
    assert [set(row) for row in json.loads(result.stdout)] == [
        {"layer", "backend", "sigma_max"}] * 2


def test_mypy_strict_is_clean_on_the_package(installed: Installed) -> None:
    checked = installed.run("-m", "mypy", "--no-incremental", "specprof_power",
                            cwd=installed.package)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Success" in checked.stdout
