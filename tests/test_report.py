"""``specprof report``: the self-contained HTML file, and that a real browser renders it."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from specprof.engine.base import AnalysisContext
from specprof.engine.cli_common import SpecprofGroup
from specprof.engine.loading import load_model
from specprof.engine.plugins import Registry, get_plugin_manager
from specprof.engine.profile import ProfileConfig, profile_model
from specprof.engine.store import Store
from specprof.plugins.analyzers.report import build_report, write_report
from specprof.plugins.analyzers.spectral import SpectralAnalyzer
from tests.models import small_cnn

PLUGINS = ("specprof.plugins.importers.onnx_importer", "specprof.plugins.backends.exact",
           "specprof.plugins.backends.toeplitz", "specprof.plugins.analyzers.spectral")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]


@dataclass
class Stored:
    db: str
    run_id: int
    second_run: int


class _Cells(HTMLParser):
    """Body rows of each table by id, and every <svg> plot's id."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, int] = {}
        self.plots: list[str] = []
        self._table: str | None = None
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "table":
            self._table = attributes.get("id") or ""
            self.rows[self._table] = 0
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._table is not None:
            self.rows[self._table] += 1
        elif tag == "svg":
            self.plots.append(attributes.get("id") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._in_body = False


def parse(text: str) -> _Cells:
    cells = _Cells()
    cells.feed(text)
    return cells


@pytest.fixture
def stored(tmp_path: Path, db_url: str) -> Stored:
    """Two runs of small_cnn (exact + toeplitz, then exact circular), a spectral analysis of
    the first, and hypergraph results as the hypergraph analyzer stores them; on SQLite and on
    PostgreSQL."""
    registry = Registry.from_manager(get_plugin_manager(PLUGINS, entry_points=False))
    path = tmp_path / "small_cnn.onnx"
    onnx.save(small_cnn(), path)
    model = load_model(path, registry=registry)
    db = db_url
    with Store.open(db) as store:
        run_id = profile_model(model, ProfileConfig(backends=("exact", "toeplitz")), store,
                               registry).run_id
        second = profile_model(model, ProfileConfig(backends=("exact",), boundary="circular"),
                               store, registry).run_id
        SpectralAnalyzer().analyze(AnalysisContext(store=store, options={"model": model}), run_id)
        _, layer_ids = store.add_model(model)
        store.add_analysis(run_id, "hypergraph", {"threshold": 0.1}, [
            {"layer_id": layer_ids[0], "spectrum_id": None,
             "metrics": {"separation": 0.25, "modularity": 0.125}},
            {"layer_id": layer_ids[1], "spectrum_id": None,
             "metrics": {"separation": 0.5, "modularity": 0.375}}])
        store.add_hypergraph(run_id, "hypergraph", "conv1", {"threshold": 0.1},
                             {"input-0": ["conv1:0", "conv1:1"]})
    return Stored(db, run_id, second)


def test_report_is_self_contained_with_table_plots_and_hypergraphs(stored: Stored) -> None:
    with Store.open(stored.db) as store:
        text = build_report(store, stored.run_id)
    cells = parse(text)
    assert cells.rows["layers-table"] == 3
    assert cells.rows["hypergraph-table"] == 2 and cells.rows["hypergraph-list"] == 1
    assert "0.375" in text and "modularity" in text
    # sigma_max by depth, backend comparison, sigma_max across the two runs, 2 ESD histograms
    # (conv1, conv2; fc has 5 values, too few, but its histogram is still drawn: 3 in all),
    # drawn as inline SVG by specprof.engine.render (the code specprof serve draws with).
    assert cells.plots == ["sigma-max-by-depth", "backend-comparison", "runs-sigma_max",
                           "esd-0", "esd-1", "esd-2"]
    assert "MP fit" in text and "<img" not in text
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", text)  # nothing external
    assert "rand_alpha" in text and "shuffled-weights baseline included" in text
    assert '"boundary": "model"' in html.unescape(text)  # the run's parameters
    assert "Lipschitz upper bound" in text


def test_report_computes_a_missing_analysis(stored: Stored, tmp_path: Path) -> None:
    with Store.open(stored.db) as store:
        assert store.analyses(run=stored.second_run, analyzer="spectral").empty
        path = write_report(store, stored.second_run, tmp_path / "second.html")
        assert len(store.analyses(run=stored.second_run, analyzer="spectral")) == 3
    text = path.read_text()
    assert parse(text).rows["layers-table"] == 3
    assert "no shuffled-weights baseline" in text
    assert "No hypergraph analysis stored" in text


def _cli() -> SpecprofGroup:
    group = SpecprofGroup("specprof")
    Registry.from_manager(get_plugin_manager(PLUGINS, entry_points=False)).pm.hook \
        .specprof_register_commands(cli=group)
    return group


def test_cli_report_defaults_to_the_latest_run(stored: Stored, tmp_path: Path) -> None:
    output = tmp_path / "out.html"
    result = CliRunner().invoke(_cli(), ["report", "--db", stored.db, "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert f"report of run {stored.second_run}" in result.stderr
    assert f"run {stored.second_run}</title>" in output.read_text()


def test_cli_report_unknown_run_is_one_line(stored: Stored, tmp_path: Path) -> None:
    result = CliRunner().invoke(_cli(), ["report", "--db", stored.db, "--run", "99",
                                         "-o", str(tmp_path / "x.html")])
    assert result.exit_code == 1 and "no run 99" in result.stderr


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "chromium not installed (apt-get install -y chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; .ci/run should install it")
        pytest.skip(message)
    return found


@pytest.mark.chromium
def test_report_renders_in_headless_chromium(stored: Stored, tmp_path: Path) -> None:
    import matplotlib.image

    chromium = _chromium()
    with Store.open(stored.db) as store:
        page = write_report(store, stored.run_id, tmp_path / "report.html").resolve()
    flags = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2000",
                    page.as_uri()], check=True, capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    not_white = (pixels < 0.9).any(axis=-1).mean()
    assert not_white > 0.02, f"screenshot nearly blank ({not_white:.3%} non-white pixels)"
    assert np.unique(pixels.reshape(-1, 3), axis=0).shape[0] > 50  # text, table and plots
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    cells = parse(dom)
    assert cells.rows["layers-table"] == 3
    assert len(cells.plots) == 6
