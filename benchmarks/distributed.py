"""In-process against a two-worker Dask cluster, side by side, on a PostgreSQL store.

The script starts a ``dask scheduler`` and two ``dask worker --no-nanny`` processes (one thread
each) on 127.0.0.1, writes four small CNNs as ONNX files (different weights, so nothing is
deduplicated), and profiles all four in one call, alternately in-process and on the cluster,
each round into a fresh PostgreSQL schema. It prints the wall times, their ratio (target: the
cluster no slower than 1.3x in-process on this project's two cores), and the numbers the
estimate in docs/distributed.md is made of. The cluster is started before the timing, as a
hand-started one would be; connecting the client is inside it.

    python benchmarks/distributed.py [--rounds 2] [--db postgresql+psycopg://...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# This file is named like the 'distributed' package: keep its folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CONVS = [(3, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1)]
"""(in channels, out channels, stride) of each 3x3 'same' convolution, on a 32x32 input."""


def small_cnn(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    nodes, tensors, name, side = [], [], "x", 32
    for i, (c_in, c_out, stride) in enumerate(CONVS):
        weight = (rng.standard_normal((c_out, c_in, 3, 3)) / np.sqrt(9 * c_in)).astype(np.float32)
        tensors.append(numpy_helper.from_array(weight, f"W{i}"))
        nodes.append(helper.make_node("Conv", [name, f"W{i}"], [f"c{i}"], name=f"conv{i}",
                                      pads=[1, 1, 1, 1], strides=[stride, stride]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        name, side = f"r{i}", side // stride
    features = CONVS[-1][1] * side * side
    fc = (rng.standard_normal((10, features)) / np.sqrt(features)).astype(np.float32)
    tensors.append(numpy_helper.from_array(fc, "F"))
    nodes += [helper.make_node("Flatten", [name], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "F"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(
        nodes, f"cnn{seed}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], initializer=tensors)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


@contextmanager
def cluster(folder: Path) -> Iterator[str]:
    """A scheduler and two single-threaded workers without nannies; yields the address."""
    dask = str(Path(sys.executable).with_name("dask"))
    scheduler_file = folder / "scheduler.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    processes = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                   "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                                  **quiet)]
    try:
        while not scheduler_file.exists():
            time.sleep(0.1)
        for _ in range(2):
            processes.append(subprocess.Popen(
                [dask, "worker", "--scheduler-file", str(scheduler_file), "--no-nanny",
                 "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"], **quiet))
        address = json.loads(scheduler_file.read_text())["address"]
        from distributed import Client

        with Client(address, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


@contextmanager
def fresh_schema(server: str) -> Iterator[str]:
    import sqlalchemy

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(server)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f'create schema "{schema}"'))
    try:
        yield f"{server}?options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text(f'drop schema "{schema}" cascade'))
        engine.dispose()


def timed_profile(models: list[str], server: str, backend: str,
                  scheduler: str | None) -> tuple[float, float, int]:
    """(wall seconds, summed backend seconds, tasks) of one call over all the models."""
    import specprof

    with fresh_schema(server) as db:
        started = time.perf_counter()
        frame = specprof.profile(models, backend=backend, db=db, scheduler=scheduler)
        wall = time.perf_counter() - started
    assert not frame.attrs["errors"], frame.attrs["errors"]
    assert (frame["status"] == "ok").all(), frame["status"].value_counts()
    return wall, float(frame["seconds"].sum()), len(frame)


def lapack_rate() -> float:
    """Flop/s of a values-only float32 SVD of a 1024 x 1024 matrix on one BLAS thread."""
    from threadpoolctl import threadpool_limits

    matrix = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    with threadpool_limits(1):
        np.linalg.svd(matrix, compute_uv=False)
        best = min(_seconds(lambda: np.linalg.svd(matrix, compute_uv=False)) for _ in range(2))
    return 4.0 * 1024**3 / best


def _seconds(call: object) -> float:
    started = time.perf_counter()
    call()  # type: ignore[operator]
    return time.perf_counter() - started


def llama_7b_flops() -> tuple[float, float]:
    """(total flops of every matrix's values-only SVD, flops of the largest) of a 7B Llama:
    32 blocks of q, k, v, o (4096 x 4096) and gate, up, down (11008 x 4096), the embedding and
    head (32000 x 4096); 4 m n^2 each (m >= n)."""
    def svd(m: int, n: int) -> float:
        return 4.0 * max(m, n) * min(m, n) ** 2

    block = 4 * svd(4096, 4096) + 3 * svd(11008, 4096)
    return 32 * block + 2 * svd(32000, 4096), svd(32000, 4096)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=os.environ.get("SPECPROF_TEST_PG", PG),
                        help="PostgreSQL server URL (a fresh schema per round)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        models = []
        for seed in range(4):
            small_cnn(folder / f"cnn{seed}.onnx", seed)
            models.append(str(folder / f"cnn{seed}.onnx"))
        with cluster(folder) as address:
            local, remote = [], []
            for _ in range(args.rounds):  # alternated, so that load drifts hit both alike
                local.append(timed_profile(models, args.db, args.backend, None))
                remote.append(timed_profile(models, args.db, args.backend, address))
    local_wall = statistics.median(wall for wall, _, _ in local)
    remote_wall = statistics.median(wall for wall, _, _ in remote)
    tasks = local[0][2]
    compute = statistics.median(seconds for _, seconds, _ in local)
    print(f"4 models, {tasks} layers, backend {args.backend}, PostgreSQL, "
          f"median of {args.rounds} rounds")
    print(f"in-process:                 {local_wall:7.2f} s  (layers computing: {compute:.2f} s)")
    print(f"2 dask workers (no nanny):  {remote_wall:7.2f} s")
    print(f"ratio cluster / in-process: {remote_wall / local_wall:7.2f}  (target <= 1.3)")

    rate = lapack_rate()
    total, largest = llama_7b_flops()
    print(f"\nfloat32 values-only SVD on one core: {rate / 1e9:.1f} GFlop/s (1024 x 1024)")
    print(f"7B Llama, every matrix: {total:.3g} flops = {total / rate / 3600:.1f} core-hours; "
          f"the largest matrix alone {largest / rate / 60:.1f} min")
    per_model = local_wall / 4
    print(f"zoo: {per_model:.2f} s per model in-process here -> 1,000 models "
          f"{1000 * per_model / 3600:.2f} h in-process")


if __name__ == "__main__":
    main()
