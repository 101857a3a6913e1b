"""A real profiling process killed with SIGKILL mid-run, then resumed (SQLite and PostgreSQL).

The child process profiles a six-layer model with a backend that announces each computation and
stalls on one layer, so the parent kills it at a known point: while layer 3 is being computed,
after layers 0-2 were stored. What is checked is the database, read by a fresh process-level
``Store.open``: only whole layer results, the run marked interrupted, and a resumed run that
computes only the missing layers (shown by the ``specprof_layer_done`` hook's ``reused`` flag).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from specprof.engine.store import Store

CHILD = r'''
import sys
import time

import numpy as np
import pluggy

from specprof.engine.plugins import Registry, get_plugin_manager
from specprof.engine.profile import ProfileConfig, profile_model
from specprof.engine.store import Store
from specprof.engine.types import Layer, LoadedModel
from specprof.plugins.backends.exact import ExactBackend

db, stall_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume"
hookimpl = pluggy.HookimplMarker("specprof")


class StallingExact(ExactBackend):
    """The exact backend, announcing each layer and stalling on one so the parent can kill."""

    name = "stalling-exact"

    def compute(self, layer, request):
        print(f"computing {layer.index}", flush=True)
        if layer.index == stall_at:
            time.sleep(300)
        return super().compute(layer, request)


class Events:
    @hookimpl
    def specprof_register_backends(self):
        return [StallingExact]

    @hookimpl
    def specprof_layer_done(self, run_id, layer, spectrum, reused):
        print(f"done {layer.index} reused={reused}", flush=True)


rng = np.random.default_rng(7)
layers = tuple(Layer(f"fc{i}", "Gemm", rng.standard_normal((12, 9)), input_shape=(9,), index=i)
               for i in range(6))
model = LoadedModel(name="six", format="onnx", framework="numpy", opset=17, layers=layers)
pm = get_plugin_manager(default_plugins=(), entry_points=False)  # only our backend
pm.register(Events())
config = ProfileConfig(backends=("stalling-exact",), resume=resume)
with Store.open(db) as store:
    result = profile_model(model, config, store, Registry.from_manager(pm))
print("run", result.run_id, "outcomes", ",".join(o.status for o in result.outcomes), flush=True)
'''


def _child(script: Path, db_url: str, stall_at: int, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(script), db_url, str(stall_at), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finished(child: subprocess.Popen[str]) -> list[str]:
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    return out.splitlines()


@pytest.mark.slow
def test_killed_run_keeps_whole_layers_and_resumes_missing_ones(db_url: str,
                                                                tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    child = _child(script, db_url, stall_at=3, mode="new")
    assert child.stdout is not None
    seen = []
    for line in child.stdout:  # wait until layer 3 is being computed: 0-2 are stored
        seen.append(line.strip())
        if line.strip() == "computing 3":
            break
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert seen[-2:] == ["done 2 reused=False", "computing 3"]

    with Store.open(db_url) as store:  # opening notices the dead writer
        runs = store.runs()
        assert runs["status"].tolist() == ["interrupted"]
        assert "ended without closing the run" in runs["error"].iloc[0]
        run_id = int(runs["id"].iloc[0])
        stored = store.query(run=run_id)
        assert stored["layer"].tolist() == ["fc0", "fc1", "fc2"]
        assert stored["status"].tolist() == ["ok"] * 3
        for spectrum_id in stored["spectrum_id"]:  # every stored result is whole
            values = store.load_spectrum(int(spectrum_id)).values
            assert values.shape == (9,) and np.all(np.diff(values) <= 0)

    resumed = _finished(_child(script, db_url, stall_at=-1, mode="resume"))
    assert resumed[-1] == f"run {run_id} outcomes reused,reused,reused,ok,ok,ok"
    done = [line for line in resumed if line.startswith("done")]
    assert done == [f"done {i} reused={i < 3}" for i in range(6)]

    # The same command again: a new run that computes nothing.
    again = _finished(_child(script, db_url, stall_at=-1, mode="new"))
    assert not any(line.startswith("computing") for line in again)
    assert all(line.endswith("reused=True") for line in again if line.startswith("done"))

    with Store.open(db_url) as store:
        runs = store.runs()
        assert runs["status"].tolist() == ["complete", "complete"]
        assert runs["id"].tolist()[1] == run_id
        assert runs["n_spectra"].tolist() == [6, 6]
        assert store.counts()["spectra"] == 12  # nothing stored twice


def test_live_running_run_is_not_marked_interrupted(db_url: str) -> None:
    from tests.test_store import make_model

    with Store.open(db_url) as store:
        model_id, _ = store.add_model(make_model())
        mine = store.start_run(model_id, {})  # this process is alive
        assert store.mark_stale_runs() == []
        assert store.run_info(mine)["status"] == "running"
