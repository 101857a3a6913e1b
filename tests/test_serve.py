"""``specprof serve``: pages, JSON and SQL over a real store, its safety rules, and that it
serves while a profile writes (SQLite and PostgreSQL, a real uvicorn, headless Chromium)."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx
import uvicorn
from starlette.testclient import TestClient

from specprof.engine.base import AnalysisContext
from specprof.engine.cli import build_cli
from specprof.engine.errors import StoreError
from specprof.engine.loading import load_model
from specprof.engine.plugins import Registry, get_plugin_manager
from specprof.engine.profile import ProfileConfig, profile_model
from specprof.engine.store import Store
from specprof.engine.store.readonly import ReadOnlyDatabase
from specprof.engine.types import LoadedModel
from specprof.plugins.analyzers.spectral import SpectralAnalyzer
from specprof.plugins.serve.app import create_app
from specprof.plugins.serve.plugin import check_bind, is_loopback, serve
from specprof.testing import small_onnx_model

PLUGINS = ("specprof.plugins.importers.onnx_importer", "specprof.plugins.backends.exact",
           "specprof.plugins.backends.toeplitz", "specprof.plugins.analyzers.spectral")
LAYERS = ("conv", "fc")
EXTERNAL = re.compile(r"""(src|href|action)=["']?\s*(https?:|//|file:)""", re.IGNORECASE)


@dataclass
class Stored:
    db: str
    first: int
    second: int
    model: LoadedModel
    registry: Registry


@pytest.fixture
def stored(tmp_path: Path, db_url: str) -> Stored:
    """Two runs of the small model (exact + toeplitz; exact circular), a spectral analysis of
    the first and a hypergraph result; on SQLite and on PostgreSQL."""
    registry = Registry.from_manager(get_plugin_manager(PLUGINS, entry_points=False))
    path = tmp_path / "small.onnx"
    onnx.save(small_onnx_model(), path)
    model = load_model(path, registry=registry)
    with Store.open(db_url) as store:
        first = profile_model(model, ProfileConfig(backends=("exact", "toeplitz")), store,
                              registry).run_id
        second = profile_model(model, ProfileConfig(backends=("exact",), boundary="circular"),
                               store, registry).run_id
        SpectralAnalyzer().analyze(AnalysisContext(store=store, options={"model": model}), first)
        _, layer_ids = store.add_model(model)
        store.add_analysis(first, "hypergraph", {"threshold": 0.1}, [
            {"layer_id": layer_ids[0], "spectrum_id": None, "metrics": {"separation": 0.25}}])
        store.add_hypergraph(first, "hypergraph", "conv", {"threshold": 0.1},
                             {"input-0": ["conv:0", "conv:1"]})
    assert first is not None and second is not None
    return Stored(db_url, first, second, model, registry)


@pytest.fixture
def client(stored: Stored) -> Iterator[TestClient]:
    with TestClient(create_app(stored.db)) as test_client:  # exceptions would fail the test
        yield test_client


class _Dom(HTMLParser):
    """Text of the cells of each table by id, and how many <svg> elements there are."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[str, list[str]] = {}
        self.svgs = 0
        self._table: str | None = None
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = dict(attrs).get("id") or ""
            self.cells[self._table] = []
        elif tag == "td" and self._table is not None:
            self._in_cell = True
            self.cells[self._table].append("")
        elif tag == "svg":
            self.svgs += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell and self._table is not None:
            self.cells[self._table][-1] += data


def dom(text: str) -> _Dom:
    parsed = _Dom()
    parsed.feed(text)
    return parsed


def query_json(db: str, *args: str) -> list[dict[str, object]]:
    result = CliRunner().invoke(build_cli(), ["query", "--db", db, "--format", "json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- pages and API ---------------------------------------------------------------------------


def test_run_page_lists_every_layer_with_plots_and_nothing_external(stored: Stored,
                                                                    client: TestClient) -> None:
    response = client.get(f"/runs/{stored.first}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = dom(response.text)
    layer_cells = page.cells["layers-table"]
    assert all(name in layer_cells for name in LAYERS)
    assert len(re.findall(r"<tr>", response.text.split('id="layers-table"')[1]
                          .split("</table>")[0])) == 5  # head + 2 layers x 2 backends
    assert page.svgs == 2  # sigma_max and alpha by depth
    assert "separation" in response.text and "hypergraph-list" in response.text
    assert '"backends"' in response.text or "&quot;backends&quot;" in response.text
    for url in ("/", f"/runs/{stored.first}", f"/compare?runs={stored.first},{stored.second}",
                f"/models/{stored.model.name}", "/sql?q=select+1", "/api"):
        text = client.get(url).text
        assert not EXTERNAL.search(text), url
    assert "default-src 'none'" in response.headers["content-security-policy"]


def test_spectrum_page_draws_the_esd_with_its_mp_fit(stored: Stored, client: TestClient) -> None:
    layers = query_json(stored.db, "--run", str(stored.first), "--backend", "exact")
    conv = next(row for row in layers if row["layer"] == "conv")
    response = client.get(f"/runs/{stored.first}/spectra/{conv['spectrum_id']}")
    assert response.status_code == 200
    assert dom(response.text).svgs == 2  # the ESD and the values by index
    assert 'id="esd"' in response.text and 'id="values"' in response.text
    other = client.get(f"/runs/{stored.second}/spectra/{conv['spectrum_id']}")
    assert other.status_code == 404  # a result of another run


def test_api_layers_match_specprof_query(stored: Stored, client: TestClient) -> None:
    response = client.get(f"/api/runs/{stored.first}/layers")
    assert response.status_code == 200
    assert response.json() == query_json(stored.db, "--run", str(stored.first))
    with Store.open(stored.db) as store:
        expected = store.query(run=stored.first)
    got = {row["spectrum_id"]: row["sigma_max"] for row in response.json()}
    want = {int(i): (None if v != v else float(v))
            for i, v in zip(expected["spectrum_id"], expected["sigma_max"], strict=True)}
    assert got.keys() == want.keys()
    assert all(got[i] == want[i] or got[i] == pytest.approx(want[i]) for i in want)
    assert sum(v is not None for v in got.values()) == 3  # toeplitz skips the matrix layer


def test_api_runs_spectra_and_compare(stored: Stored, client: TestClient) -> None:
    runs = client.get("/api/runs").json()
    assert [row["id"] for row in runs] == [stored.second, stored.first]
    cli = CliRunner().invoke(build_cli(), ["runs", "--db", stored.db, "--format", "json"])
    assert runs == json.loads(cli.stdout)
    assert client.get("/api/runs", params={"status": "failed"}).json() == []
    assert client.get("/api/runs", params={"model": "nomatch*"}).json() == []
    row = query_json(stored.db, "--run", str(stored.first), "--layer", "fc",
                     "--backend", "exact")[0]
    spectrum = client.get(f"/api/spectra/{row['spectrum_id']}").json()
    with Store.open(stored.db) as store:
        values = store.load_spectrum(int(row["spectrum_id"])).values  # type: ignore[call-overload]
    assert np.allclose(spectrum["values"], values) and spectrum["n_values"] == 5
    compared = client.get(f"/api/compare?runs={stored.first},{stored.second}").json()
    assert [r["run"] for r in compared["runs"]] == [stored.first, stored.second]
    assert {(r["layer"], r["kind"]) for r in compared["layers"]} == {("conv", "operator"),
                                                                      ("fc", "operator")}
    fc = next(r for r in compared["layers"] if r["layer"] == "fc")
    assert fc["runs"][str(stored.first)]["sigma_max"] == pytest.approx(row["sigma_max"])
    assert fc["sigma_max_change"] == pytest.approx(0.0, abs=1e-9)  # a matrix has no padding


def test_compare_and_model_pages(stored: Stored, client: TestClient) -> None:
    both = f"{stored.first},{stored.second}"
    for url in (f"/compare?runs={both}", f"/compare?runs={stored.first}&runs={stored.second}"):
        response = client.get(url)
        assert response.status_code == 200
        page = dom(response.text)
        assert all(name in page.cells["compare-table"] for name in LAYERS)
        assert page.svgs == 1
    model = client.get(f"/models/{stored.model.name}")
    assert model.status_code == 200 and dom(model.text).svgs == 2
    assert f"/compare?runs={stored.first}%2C{stored.second}" in model.text
    index = client.get("/", params={"model": "small*", "status": "complete"})
    assert index.status_code == 200
    assert dom(index.text).cells["runs-table"].count(stored.model.name) == 2


def test_sql_is_read_only_with_csv(stored: Stored, client: TestClient) -> None:
    q = "SELECT layer, sigma_max FROM layer_summary WHERE backend = 'exact' ORDER BY layer"
    page = client.get("/sql", params={"q": q})
    assert page.status_code == 200 and dom(page.text).cells["sql-table"][::2] == [
        "conv", "conv", "fc", "fc"]
    csv = client.get("/sql", params={"q": q, "format": "csv"})
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    lines = csv.text.splitlines()
    assert lines[0] == "layer,sigma_max" and len(lines) == 5  # two runs, two layers
    for bad in ("DELETE FROM runs", "SELECT 1; DELETE FROM runs", "DROP VIEW layer_summary",
                "UPDATE runs SET status = 'failed'", "   "):
        response = client.get("/sql", params={"q": bad})
        assert response.status_code in (200, 400), bad
        if bad.strip():
            assert response.status_code == 400 and 'class="error"' in response.text, bad
    assert len(client.get("/api/runs").json()) == 2


def test_readonly_database_refuses_writes(stored: Stored) -> None:
    database = ReadOnlyDatabase(stored.db)
    try:
        result = database.execute("SELECT count(*) AS n FROM run_summary WHERE run_id = :run",
                                  {"run": stored.first})
        assert result.columns == ["n"] and result.rows == [(1,)]
        for statement in ("DELETE FROM runs", "INSERT INTO models (name) VALUES ('x')",
                          "SELECT 1; DELETE FROM runs"):
            with pytest.raises(StoreError):
                database.execute(statement)
    finally:
        database.close()
    with Store.open(stored.db) as store:
        assert store.counts()["runs"] == 2


# --- safety --------------------------------------------------------------------------------


BAD_REQUESTS = ["/runs/abc", "/runs/0", "/runs/-1", "/runs/99999", "/runs/1e3",
                "/runs/99999999999999999999999999", "/runs/1/spectra/x", "/runs/1/spectra/99999",
                "/compare", "/compare?runs=", "/compare?runs=1", "/compare?runs=a,b",
                "/compare?runs=1;DROP TABLE runs", "/compare?runs=1,99999",
                "/models/no-such-model", "/models/x' OR '1'='1", "/?status=bogus",
                "/runs/1?where=1=1; DROP TABLE runs", "/runs/1?sort=sigma_max;--",
                "/sql?format=xml", "/api/runs/abc/layers", "/api/runs/99999/layers",
                "/api/spectra/0", "/api/spectra/99999", "/api/compare?runs=1",
                "/api/runs?status=x", "/no/such/page", "/api/runs/1/layers?where=drop"]


def test_bad_requests_are_4xx_with_a_message(client: TestClient) -> None:
    for url in BAD_REQUESTS:
        response = client.get(url)
        assert 400 <= response.status_code < 500, (url, response.status_code)
        if url.startswith("/api"):
            assert response.json()["error"], url
        else:
            assert 'class="error"' in response.text or "detail" in response.text, url
        assert "Traceback" not in response.text and "sqlite://" not in response.text


def test_writes_are_refused_and_change_nothing(stored: Stored, client: TestClient) -> None:
    with Store.open(stored.db) as store:
        before = store.counts()
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for url in ("/", f"/runs/{stored.first}", f"/api/runs/{stored.first}/layers", "/sql"):
            response = client.request(method, url, content=b"DELETE FROM runs")
            assert response.status_code == 405 and response.headers["allow"] == "GET, HEAD"
    head = client.head(f"/runs/{stored.first}")
    assert head.status_code == 200 and head.content == b""
    with Store.open(stored.db) as store:
        assert store.counts() == before


def test_token_is_required_when_set(stored: Stored) -> None:
    with TestClient(create_app(stored.db, token="s3cret")) as guarded:
        assert guarded.get("/api/runs").status_code == 401
        assert guarded.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert guarded.get("/static/specprof.css").status_code == 401
        ok = guarded.get("/api/runs", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and len(ok.json()) == 2


def test_default_bind_is_loopback_and_other_hosts_need_a_token(
        stored: Stored, monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = {param.name: param.default for param in serve.params}
    assert defaults["host"] == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    check_bind("0.0.0.0", "token")
    monkeypatch.delenv("SPECPROF_TOKEN", raising=False)
    result = CliRunner().invoke(build_cli(), ["serve", "--db", stored.db, "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "--token" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_missing_database_file_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(build_cli(), ["serve", "--db", str(tmp_path / "none.db")])
    assert result.exit_code == 1 and "no database file" in result.stderr
    assert not (tmp_path / "none.db").exists()


def test_new_runs_show_without_a_restart(stored: Stored, client: TestClient) -> None:
    assert len(client.get("/api/runs").json()) == 2
    with Store.open(stored.db) as store:
        third = profile_model(stored.model, ProfileConfig(backends=("exact",), force=True),
                              store, stored.registry).run_id
    assert client.get("/api/runs").json()[0]["id"] == third
    assert client.get(f"/runs/{third}").status_code == 200


def test_names_from_the_database_are_escaped(stored: Stored, client: TestClient,
                                             tmp_path: Path) -> None:
    hostile = "<script>alert(1)</script>"
    path = tmp_path / "other.onnx"
    onnx.save(small_onnx_model(seed=1), path)  # other weights: a model of its own
    other = load_model(path, registry=stored.registry)
    model = dataclasses.replace(other, name=hostile, layers=[
        dataclasses.replace(layer, name=f"{layer.name}<img src=x>") for layer in other.layers])
    with Store.open(stored.db) as store:
        run = profile_model(model, ProfileConfig(backends=("exact",), force=True), store,
                            stored.registry).run_id
    for url in ("/", f"/runs/{run}", f"/models/{quote(hostile, safe='')}",
                f"/compare?runs={stored.first},{run}"):
        response = client.get(url)
        assert response.status_code == 200, url
        assert "<script>alert" not in response.text and "<img src=x>" not in response.text, url
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response.text, url


def test_a_missing_extra_is_one_line(stored: Stored, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    result = CliRunner().invoke(build_cli(), ["serve", "--db", stored.db])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "Error: specprof serve needs the 'serve' extra, which is not installed; "
        "run: pip install 'specprof[serve]'"]


# --- a real server -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def server(stored: Stored) -> Iterator[str]:
    """uvicorn serving the store on a free loopback port, in a thread; its base URL."""
    port = _free_port()
    # A long keep-alive: the test's client reuses pooled connections, and one the server
    # closes just as a request goes out reads as "connection reset" (a client-side race).
    config = uvicorn.Config(create_app(stored.db), host="127.0.0.1", port=port,
                            log_level="warning", timeout_keep_alive=120)
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not running.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        running.should_exit = True
        thread.join(timeout=20)


@pytest.mark.slow
def test_serves_300_requests_while_a_profile_writes(stored: Stored, server: str) -> None:
    if not stored.db.startswith("sqlite"):
        pytest.skip("the concurrency check is about SQLite's single writer")
    stop, written = threading.Event(), []

    def write() -> None:
        with Store.open(stored.db) as store:
            while not stop.is_set():
                run = profile_model(stored.model, ProfileConfig(backends=("exact",), force=True),
                                    store, stored.registry)
                written.append(run.run_id)

    urls = ["/", f"/runs/{stored.first}", "/api/runs", f"/api/runs/{stored.first}/layers",
            f"/compare?runs={stored.first},{stored.second}",
            "/sql?q=SELECT+count(*)+FROM+layer_summary"]
    writer = threading.Thread(target=write)
    writer.start()
    try:
        with httpx.Client(base_url=server, timeout=60) as http:
            with ThreadPoolExecutor(20) as pool:
                statuses = list(pool.map(lambda i: http.get(urls[i % len(urls)]).status_code,
                                         range(300)))
    finally:
        stop.set()
        writer.join(timeout=120)
    assert statuses == [200] * 300
    assert written, "the profile wrote no run while the requests ran"


def _chromium() -> str:
    import shutil

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    return found


@pytest.mark.slow
@pytest.mark.chromium
def test_pages_render_in_headless_chromium(stored: Stored, server: str, tmp_path: Path) -> None:
    import matplotlib.image

    chromium = _chromium()
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    for name, url, table_id in ((f"run-{stored.first}", f"{server}/runs/{stored.first}",
                                 "layers-table"),
                                ("compare", f"{server}/compare?runs={stored.first},"
                                            f"{stored.second}", "compare-table")):
        shot = tmp_path / f"{name}.png"
        subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,900", url],
                       check=True, capture_output=True, timeout=120)
        pixels = matplotlib.image.imread(shot)[..., :3]
        not_white = (pixels < 0.9).any(axis=-1).mean()
        assert not_white > 0.01, f"{name}: screenshot nearly blank ({not_white:.3%})"
        assert np.unique(pixels.reshape(-1, 3), axis=0).shape[0] > 50, name  # text, plots
        text = subprocess.run([*flags, "--dump-dom", url], check=True, capture_output=True,
                              text=True, timeout=120).stdout
        page = dom(text)
        assert all(layer in page.cells[table_id] for layer in LAYERS), name
        assert page.svgs >= 1


def test_a_checkpoint_run_is_plotted_by_block_and_role(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    import specprof

    rng = np.random.default_rng(0)
    tensors = {f"model.layers.{block}.self_attn.{proj}.weight":
               rng.standard_normal((16, 16)).astype(np.float32)
               for block in range(3) for proj in ("q_proj", "k_proj", "v_proj")}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    db = str(tmp_path / "ckpt.db")
    run = int(specprof.profile(tmp_path / "model.safetensors", db=db).attrs["run_id"])
    with Store.open(db) as store:
        SpectralAnalyzer().analyze(AnalysisContext(store, {}), run)
    with TestClient(create_app(db)) as test_client:
        page = test_client.get(f"/runs/{run}")
    assert page.status_code == 200
    assert 'id="sigma-max-by-block"' in page.text and 'id="alpha-by-block"' in page.text
    for role in ("q", "k", "v"):
        assert f">{role}<" in page.text  # one line per role, labelled
