"""Profiling on Dask: a real LocalCluster of worker processes, real SIGKILLs, the store checked.

A test backend, ``slow-exact`` (the exact backend after a pause), is installed as a third-party
plugin: a module and its ``.dist-info`` on ``sys.path`` (and ``PYTHONPATH`` for the processes
started here), so the workers, the CLI and this process all find it. Each computation leaves a
marker file ``<layer>.<pid>``: a layer computed twice, or on the worker that was killed, shows.
The oracle for every value is NumPy's SVD of the weight matrix.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import specprof
from specprof.engine.distributed import DaskExecutor, open_executor
from specprof.engine.errors import SpecprofError
from specprof.engine.plugins import Registry, get_plugin_manager
from specprof.engine.profile import (
    LayerOutcome,
    LayerSummary,
    ProfileConfig,
    Task,
    profile_model,
)
from specprof.engine.store import Store
from specprof.engine.types import Layer, LoadedModel, Request, StreamedLayers

distributed = pytest.importorskip("distributed")

SLOWPLUG = '''
"""A test plugin: the exact backend after a pause, leaving a marker per computation."""
import os
import time
from pathlib import Path

import pluggy

from specprof.plugins.backends.exact import ExactBackend

hookimpl = pluggy.HookimplMarker("specprof")


class SlowExact(ExactBackend):
    name = "slow-exact"
    description = "exact, after a pause (tests)"

    def compute(self, layer, request):
        marks = os.environ.get("SLOWPLUG_MARKS")
        if marks:
            Path(marks, f"{layer.name}.{os.getpid()}").touch()
        time.sleep(float(os.environ.get("SLOWPLUG_DELAY", "0.3")))
        return super().compute(layer, request)


@hookimpl
def specprof_register_backends():
    return [SlowExact]
'''


def oracle(weight: np.ndarray) -> np.ndarray:
    return np.linalg.svd(np.asarray(weight, dtype=np.float64), compute_uv=False)


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The slow-exact plugin importable here and in every process started from here; yields
    the environment for subprocesses (``marks`` is where the markers go)."""
    site = tmp_path_factory.mktemp("site")
    marks = tmp_path_factory.mktemp("marks")
    (site / "slowplug.py").write_text(SLOWPLUG)
    info = site / "slowplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: slowplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[specprof]\nslowplug = slowplug\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(site))
        patch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
        patch.setenv("SLOWPLUG_MARKS", str(marks))
        yield {"PYTHONPATH": os.environ["PYTHONPATH"], "SLOWPLUG_MARKS": str(marks),
               "marks": str(marks)}


@pytest.fixture(scope="module")
def cluster(plugin_site: dict[str, str]) -> Iterator[Any]:
    """Two worker processes (with nannies), each declaring 100 MiB of MEMORY for tasks."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  memory_limit="4GiB", resources={"MEMORY": 100 * 2**20},
                                  dashboard_address=":0", host="127.0.0.1",
                                  silence_logs=logging.ERROR) as local:
        yield local


def slow_registry() -> Registry:
    import slowplug  # type: ignore[import-not-found]

    pm = get_plugin_manager(entry_points=False)
    pm.register(slowplug, name="slowplug")
    return Registry.from_manager(pm)


def gemm_model(prefix: str, n_layers: int, seed: int = 0) -> LoadedModel:
    rng = np.random.default_rng(seed)
    layers = tuple(Layer(f"{prefix}{i}", "Gemm", rng.standard_normal((12 + i, 9)),
                         input_shape=(9,), index=i) for i in range(n_layers))
    return LoadedModel(name=prefix, format="onnx", framework="numpy", opset=18, layers=layers)


def gemm_chain(path: Path, prefix: str, n_layers: int, seed: int) -> list[np.ndarray]:
    """An ONNX chain of Gemm layers named ``{prefix}{i}``; returns their (out, in) weights."""
    rng = np.random.default_rng(seed)
    sizes = [int(n) for n in rng.integers(6, 14, size=n_layers + 1)]
    weights, nodes, tensors = [], [], []
    for i in range(n_layers):
        weight = rng.standard_normal((sizes[i + 1], sizes[i])).astype(np.float32)
        weights.append(weight)
        tensors.append(numpy_helper.from_array(weight, f"W{i}"))
        nodes.append(helper.make_node("Gemm", [f"h{i}", f"W{i}"], [f"h{i + 1}"],
                                      name=f"{prefix}{i}", transB=1))
    graph = helper.make_graph(
        nodes, prefix, [helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, sizes[0]])],
        [helper.make_tensor_value_info(f"h{n_layers}", TensorProto.FLOAT, [1, sizes[-1]])],
        initializer=tensors)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return weights


def markers(plugin_site: dict[str, str], prefix: str) -> dict[str, list[int]]:
    """layer name -> pids of the processes that started computing it."""
    found: dict[str, list[int]] = {}
    for mark in Path(plugin_site["marks"]).glob(f"{prefix}*"):
        layer, pid = mark.name.rsplit(".", 1)
        found.setdefault(layer, []).append(int(pid))
    return found


def cli(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "specprof", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def results_once(store: Store, run_id: int, names: list[str]) -> Any:
    """The run's rows, after checking there is exactly one per layer."""
    rows = store.query(run=run_id, values=True)
    assert sorted(rows["layer"]) == sorted(names)
    return rows


# --- a hand-built cluster: values, a killed worker, a killed client, memory ------------------

@pytest.mark.slow
def test_worker_killed_mid_run_is_retried_and_values_match_in_process(
        cluster: Any, plugin_site: dict[str, str], tmp_path: Path) -> None:
    model = gemm_model("kill", 10)
    registry = slow_registry()
    killed: list[int] = []

    with open_executor(scheduler=cluster.scheduler_address) as executor, \
            Store.open(f"sqlite:///{tmp_path}/dask.db") as store:
        assert isinstance(executor, DaskExecutor)
        client = executor.client

        def kill_a_busy_worker(_outcome: LayerOutcome) -> None:
            if killed:
                return
            busy = [address for address, keys in client.processing().items() if keys]
            pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

        result = profile_model(model, ProfileConfig(backends=("slow-exact",)), store, registry,
                               on_layer=kill_a_busy_worker, executor=executor)
        assert [o.status for o in result.outcomes] == ["ok"] * 10
        rows = results_once(store, result.run_id, [layer.name for layer in model.layers])
        assert store.runs()["status"].tolist() == ["complete"]
        assert store.counts()["spectra"] == 10
        distributed_values = dict(zip(rows["layer"], rows["singular_values"], strict=True))

    started = markers(plugin_site, "kill")
    retried = [name for name, pids in started.items() if killed[0] in pids and len(pids) == 2]
    assert retried, "no layer the killed worker was computing was computed again"
    assert all(len(pids) <= 2 for pids in started.values())

    with Store.open(f"sqlite:///{tmp_path}/local.db") as store:
        local = profile_model(model, ProfileConfig(backends=("exact",)), store, registry)
    for layer, outcome in zip(model.layers, local.outcomes, strict=True):
        assert outcome.spectrum is not None
        truth = oracle(layer.weight)
        np.testing.assert_allclose(distributed_values[layer.name], outcome.spectrum.values,
                                   rtol=0, atol=1e-10 * truth[0])
        np.testing.assert_allclose(distributed_values[layer.name], truth, rtol=0,
                                   atol=1e-10 * truth[0])


@pytest.mark.slow
def test_client_killed_mid_run_then_resume_computes_only_the_rest(
        cluster: Any, plugin_site: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "twelve.onnx"
    gemm_chain(path, "ck", 12, seed=1)
    db = f"sqlite:///{tmp_path}/kill.db"
    command = ["profile", str(path), "--db", db, "--backend", "slow-exact",
               "--scheduler", cluster.scheduler_address, "--output-format", "json"]
    child = cli(*command, env=plugin_site)
    deadline = time.monotonic() + 90
    stored = 0
    while stored < 2:
        assert child.poll() is None, child.communicate()[1]
        assert time.monotonic() < deadline, "no layer stored in 90 s"
        time.sleep(0.05)
        if Path(f"{tmp_path}/kill.db").exists():
            with Store.open(db) as store:
                stored = store.counts()["spectra"]
    os.kill(child.pid, signal.SIGKILL)
    child.communicate(timeout=30)

    with Store.open(db) as store:  # opening notices the dead client
        runs = store.runs()
        assert runs["status"].tolist() == ["interrupted"]
        run_id = int(runs["id"].iloc[0])
        before = set(store.query(run=run_id)["layer"])
    assert 2 <= len(before) < 12

    resumed = cli(*command, "--resume", env=plugin_site)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    rows = json.loads(out)
    assert {row["run"] for row in rows} == {run_id}
    assert sorted(row["status"] for row in rows) == ["ok"] * (12 - len(before)) + \
        ["reused"] * len(before)
    with Store.open(db) as store:
        results_once(store, run_id, [f"ck{i}" for i in range(12)])
        assert store.runs()["status"].tolist() == ["complete"]
        assert store.counts()["spectra"] == 12
    started = markers(plugin_site, "ck")
    assert all(len(started[name]) == 1 for name in before)  # stored ones never recomputed


def test_a_layer_that_fits_no_worker_gets_a_failed_row(cluster: Any, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    big = Layer("huge", "Gemm", np.zeros((3000, 3000)), input_shape=(3000,), index=1)
    small = Layer("small", "Gemm", rng.standard_normal((20, 10)), input_shape=(10,), index=0)
    model = LoadedModel(name="mem", format="onnx", framework="numpy", opset=18,
                        layers=(small, big))
    with open_executor(scheduler=cluster.scheduler_address) as executor, \
            Store.open(f"sqlite:///{tmp_path}/mem.db") as store:
        result = profile_model(model, ProfileConfig(backends=("exact",)), store,
                               slow_registry(), executor=executor)
        rows = results_once(store, result.run_id, ["small", "huge"]).set_index("layer")
    assert rows.loc["small", "status"] == "ok"
    assert rows.loc["huge", "status"] == "failed"
    assert "the largest Dask worker holds 100.0 MiB" in rows.loc["huge", "message"]
    np.testing.assert_allclose(rows.loc["small", "singular_values"], oracle(small.weight),
                               rtol=0, atol=1e-10 * oracle(small.weight)[0])
    # Through the API the workers' room is the memory limit, so auto and named backends are
    # chosen (or refused) for the workers, not for this machine.
    frame = specprof.profile(model, backend="exact", db=f"sqlite:///{tmp_path}/api.db",
                             scheduler=cluster.scheduler_address).set_index("layer")
    assert frame.loc["small", "status"] == "ok"
    assert frame.loc["huge", "status"] == "skipped"
    assert "above the 100.0 MiB limit" in frame.loc["huge", "reason"]


def test_big_layers_ask_for_memory_and_cuda_runs_ask_for_a_gpu(
        cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from specprof.engine import distributed as executors

    monkeypatch.setattr(executors, "BIG_TASK_BYTES", 2**20)  # 'big' from 1 MiB, for the test
    rng = np.random.default_rng(4)
    backend = slow_registry().backend("exact")
    big = Task(Layer("big", "Gemm", rng.standard_normal((600, 600)), input_shape=(600,)), 1,
               backend, Request(), "", 1)
    tiny = Task(Layer("tiny", "Gemm", rng.standard_normal((5, 4)), input_shape=(4,)), 1,
                backend, Request(), "", 1)
    with open_executor(scheduler=cluster.scheduler_address) as executor:
        assert isinstance(executor, DaskExecutor)
        need = executors.task_memory(big)
        assert 2**20 <= need == backend.memory(big.layer, big.request)
        assert executor.task_resources(big) == {"MEMORY": need}
        assert executor.task_resources(tiny) is None
    with pytest.raises(SpecprofError, match="declares a GPU") as refused, \
            open_executor(scheduler=cluster.scheduler_address, device="cuda"):
        pass
    assert "dask worker ADDRESS --resources GPU=1" in refused.value.one_line()


# --- a scheduler that goes away -----------------------------------------------------------

@pytest.mark.slow
def test_scheduler_gone_leaves_an_interrupted_run_and_one_line(
        plugin_site: dict[str, str], tmp_path: Path) -> None:
    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "SLOWPLUG_DELAY": "0.5"}
    dask = str(Path(sys.executable).with_name("dask"))
    scheduler = subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                  "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                                 stderr=subprocess.DEVNULL, env=env)
    worker = None
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            assert time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.1)
        worker = subprocess.Popen([dask, "worker", "--scheduler-file", str(scheduler_file),
                                   "--no-nanny", "--nthreads", "1", "--no-dashboard"],
                                  stderr=subprocess.DEVNULL, env=env)
        address = json.loads(scheduler_file.read_text())["address"]
        path = tmp_path / "eight.onnx"
        gemm_chain(path, "gone", 8, seed=2)
        db = f"sqlite:///{tmp_path}/gone.db"
        child = cli("profile", str(path), "--db", db, "--backend", "slow-exact",
                    "--scheduler", address, env={**plugin_site, "SLOWPLUG_DELAY": "0.5"})
        stored = 0
        while stored < 1:
            assert child.poll() is None, child.communicate()[1]
            assert time.monotonic() < deadline + 60, "no layer stored"
            time.sleep(0.05)
            if (tmp_path / "gone.db").exists():
                with Store.open(db) as store:
                    stored = store.counts()["spectra"]
        scheduler.send_signal(signal.SIGKILL)
        _, err = child.communicate(timeout=120)  # never a hang
        assert child.returncode == 1
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("Error: lost the Dask scheduler at tcp://")

        with Store.open(db) as store:
            runs = store.runs()
            assert runs["status"].tolist() == ["interrupted"]
            assert "lost the Dask scheduler" in runs["error"].iloc[0]
            run_id = int(runs["id"].iloc[0])
            before = len(store.query(run=run_id))
            assert 1 <= before < 8
            # The same run resumed here, in-process: only the missing layers are computed.
            again = profile_model(specprof.load_model(path),
                                  ProfileConfig(backends=("slow-exact",), resume=True), store,
                                  slow_registry())
            assert again.run_id == run_id
            assert [o.status for o in again.outcomes].count("reused") == before
            results_once(store, run_id, [f"gone{i}" for i in range(8)])
            assert store.counts()["spectra"] == 8
    finally:
        for process in (worker, scheduler):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=30)


# --- --workers, several models per command -----------------------------------------------

@pytest.mark.slow
def test_workers_flag_profiles_a_glob_of_models_and_reports_the_broken_one(
        db_url: str, tmp_path: Path, plugin_site: dict[str, str]) -> None:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    weights = {"alpha": gemm_chain(zoo / "alpha.onnx", "a", 3, seed=5),
               "beta": gemm_chain(zoo / "beta.onnx", "b", 2, seed=6)}
    (zoo / "broken.onnx").write_bytes(b"not a model at all")
    child = cli("profile", str(zoo / "*.onnx"), "--workers", "2", "--db", db_url,
                "--backend", "exact", "--output-format", "json", env={})
    out, err = child.communicate(timeout=180)
    assert child.returncode == 1, err
    assert "broken.onnx" in err and "1 of 3 models failed" in err
    assert "Traceback" not in err
    rows = json.loads(out)
    assert sorted({Path(row["model"]).stem for row in rows}) == ["alpha", "beta"]
    for row in rows:
        weight = weights[Path(row["model"]).stem][row["index"]]
        assert row["status"] == "ok"
        assert row["sigma_max"] == pytest.approx(oracle(weight)[0], rel=1e-10)
    with Store.open(db_url) as store:
        runs = store.runs()
        assert runs["status"].tolist() == ["complete", "complete"]
        for run_id, model in zip(runs["id"], runs["model"], strict=True):
            results_once(store, int(run_id),
                         [f"{model[0]}{i}" for i in range(len(weights[model]))])
        assert store.counts()["spectra"] == 5


# --- in-process pieces: the API's several models, globs and folders, memory ---------------

def test_the_api_takes_several_models_and_goes_on_past_a_broken_one(tmp_path: Path) -> None:
    first = gemm_chain(tmp_path / "one.onnx", "o", 2, seed=7)
    gemm_chain(tmp_path / "two.onnx", "t", 1, seed=8)
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage")
    db = f"sqlite:///{tmp_path}/api.db"
    frame = specprof.profile([str(tmp_path / "one.onnx"), str(tmp_path / "b*.onnx"),
                              str(tmp_path / "two.onnx")], backend="exact", db=db)
    assert list(frame.columns[:2]) == ["model", "run"]
    assert [Path(m).name for m in frame["model"]] == ["one.onnx", "one.onnx", "two.onnx"]
    assert list(frame.attrs["errors"]) == [str(tmp_path / "bad.onnx")]
    assert set(frame.attrs["runs"]) == {str(tmp_path / "one.onnx"), str(tmp_path / "two.onnx")}
    assert frame["sigma_max"].iloc[0] == pytest.approx(oracle(first[0])[0], rel=1e-10)
    single = specprof.profile(str(tmp_path / "one.onnx"), backend="exact", db=db)
    assert "model" not in single.columns and single.attrs["run_id"] > 0


def test_model_sources_expands_globs_and_folders_of_models(tmp_path: Path) -> None:
    from specprof.engine.api import model_sources

    for name in ("b.onnx", "a.onnx", "notes.txt", ".hidden.onnx"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    found = model_sources([str(tmp_path), str(tmp_path / "*.onnx"), str(tmp_path / "no*.pt")])
    assert found == [str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"),
                     str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"),
                     str(tmp_path / "no*.pt")]


def test_outcomes_keep_no_weights(tmp_path: Path) -> None:
    """A streamed checkpoint's layers are let go once profiled: the run's outcomes keep a
    weightless summary, so memory holds one tensor at a time, not the model."""
    rng = np.random.default_rng(9)
    matrices = [rng.standard_normal((40, 30)) for _ in range(5)]
    alive: list[weakref.ref[np.ndarray]] = []

    def build(position: int) -> Layer:
        layer = Layer(f"w{position}", "MatMul", matrices[position], input_shape=(30,),
                      index=position)
        alive.append(weakref.ref(layer.weight))
        return layer

    model = LoadedModel(name="streamed", format="safetensors", framework="numpy", opset=0,
                        layers=StreamedLayers(build, [m.size for m in matrices]))
    with Store.open(f"sqlite:///{tmp_path}/s.db") as store:
        result = profile_model(model, ProfileConfig(backends=("exact",)), store,
                               slow_registry())
    gc.collect()
    assert alive and not any(ref() is not None for ref in alive)
    assert all(isinstance(o.layer, LayerSummary) for o in result.outcomes)
    assert [o.layer.describe() for o in result.outcomes] == ["MatMul 30->40"] * 5
    assert result.outcomes[2].spectrum is not None
    np.testing.assert_allclose(result.outcomes[2].spectrum.values, oracle(matrices[2]),
                               rtol=0, atol=1e-10 * oracle(matrices[2])[0])
