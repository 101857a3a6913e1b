"""Durability under faults, measured: ``specprof profile`` killed with SIGKILL at random points,
on SQLite and on PostgreSQL, then 8 concurrent writers on PostgreSQL.

    python benchmarks/durability.py [--kills 100] [--writers 8] [--seed 0]
        [--postgres postgresql://postgres@127.0.0.1:5432/test] [--no-postgres]

Each database gets rounds until ``--kills`` of them were killed. A round starts ``specprof profile MODEL --resume --force``
(the model: eight small convolutions, exact and filter backends) and kills it after a random
delay drawn from [0, one uncut run's time), so kills land in start-up, planning, computing and
writing alike (a round that finishes first is not a kill, and shortens later delays). After
every round the database is read by a fresh process and checked:
- SQLite's ``PRAGMA integrity_check`` is ``ok``;
- no (run, layer, backend) result row exists twice (duplicated);
- every result row seen after an earlier kill is still there, unchanged (lost otherwise);
- every result row marked ok has its values (no half-written row).
The next round's ``--resume`` continues the killed run; after the last round one uncut
``--resume`` finishes it. Every run must then be complete with exactly one row per (layer,
backend): a run that is not is left corrupt; one that is counts as a resume that completed.

The concurrent part starts ``--writers`` processes at once, each profiling the same model into
one PostgreSQL database, and checks that every run is complete with all its rows, once.

PostgreSQL work happens in a database of its own (``specprof_durability_<pid>``), created and
dropped here, so the server's other databases are not touched. Prints one table.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LAYERS = 8
BACKENDS = ("exact", "filter")


def write_model(path: Path) -> None:
    """Eight 8->8 3x3 convolutions on an 8 x 8 input: each exact SVD is a 512 x 512 matrix."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights = [], []
    for index in range(LAYERS):
        name = f"w{index}"
        weights.append(numpy_helper.from_array(
            rng.standard_normal((8, 8, 3, 3)).astype(np.float32), name))
        nodes.append(helper.make_node("Conv", [f"x{index}", name], [f"x{index + 1}"],
                                      name=f"conv{index}", pads=[1, 1, 1, 1]))
    graph = helper.make_graph(
        nodes, "durability",
        [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, 8, 8, 8])],
        [helper.make_tensor_value_info(f"x{LAYERS}", TensorProto.FLOAT, [1, 8, 8, 8])],
        initializer=weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def profile_command(model: Path, db: str) -> list[str]:
    return [sys.executable, "-m", "specprof", "profile", str(model), "--db", db, "--resume",
            "--force", "--backend", ",".join(BACKENDS), "-q", "--output-format", "json"]


@dataclass
class Tally:
    """Counts for one database."""

    kills: int = 0
    rounds: int = 0
    corrupt_checks: int = 0
    lost: int = 0
    duplicated: int = 0
    half_rows: int = 0
    runs: int = 0
    runs_complete: int = 0
    runs_corrupt: int = 0
    seen: dict[int, tuple[int, int, str, str]] = field(default_factory=dict)


def _rows(db: str) -> list[tuple[int, int, int, str, str, bool]]:
    """(id, run, layer, backend, status, has values) of every result row."""
    from sqlalchemy import create_engine, text

    from specprof.engine.store.urls import resolve_url

    engine = create_engine(resolve_url(db))
    try:
        with engine.connect() as connection:
            return [(int(a), int(b), int(c), str(d), str(e), bool(f)) for a, b, c, d, e, f in
                    connection.execute(text(
                        "select id, run_id, layer_id, backend, status, \"values\" is not null "
                        "from spectra"))]
    finally:
        engine.dispose()


def check(db: str, tally: Tally, sqlite_path: Path | None) -> None:
    """Read the database after a kill and count what is wrong with it."""
    from specprof.engine.store import Store

    if sqlite_path is not None and sqlite_path.exists():
        import sqlite3

        with sqlite3.connect(sqlite_path) as connection:
            if connection.execute("pragma integrity_check").fetchone()[0] != "ok":
                tally.corrupt_checks += 1
    with Store.open(db):  # what every next command does first: marks the killed run
        pass
    rows = _rows(db)
    now = {row[0]: (row[1], row[2], row[3], row[4]) for row in rows}
    tally.lost += sum(1 for row_id, row in tally.seen.items() if now.get(row_id) != row)
    keys = [(run, layer, backend) for _, run, layer, backend, _, _ in rows]
    tally.duplicated += len(keys) - len(set(keys))
    tally.half_rows += sum(1 for *_, status, has_values in rows if status == "ok" and not has_values)
    tally.seen = now


def finish(db: str, model: Path, tally: Tally) -> None:
    """One uncut resume, then every run must be complete with one row per (layer, backend)."""
    from sqlalchemy import create_engine, text

    from specprof.engine.store.urls import resolve_url

    subprocess.run(profile_command(model, db), check=True, capture_output=True, timeout=600)
    engine = create_engine(resolve_url(db))
    try:
        with engine.connect() as connection:
            runs = list(connection.execute(text("select id, status from runs")))
            counts = dict(connection.execute(text(
                "select run_id, count(distinct layer_id || backend) from spectra "
                "group by run_id")).all())
    finally:
        engine.dispose()
    tally.runs = len(runs)
    for run_id, status in runs:
        if status == "complete" and counts.get(run_id, 0) == LAYERS * len(BACKENDS):
            tally.runs_complete += 1
        else:
            tally.runs_corrupt += 1


def kill_rounds(db: str, model: Path, kills: int, rng: random.Random,
                sqlite_path: Path | None) -> Tally:
    started = time.perf_counter()
    subprocess.run(profile_command(model, db), check=True, capture_output=True, timeout=600)
    uncut = time.perf_counter() - started
    tally = Tally()
    for _ in range(3 * kills):  # rounds until ``kills`` kills (a round may finish first)
        if tally.kills == kills:
            break
        round_started = time.perf_counter()
        process = subprocess.Popen(profile_command(model, db), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=rng.uniform(0.0, uncut))
            uncut = min(uncut, time.perf_counter() - round_started)  # it ran faster this time
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            tally.kills += 1
        tally.rounds += 1
        check(db, tally, sqlite_path)
    finish(db, model, tally)
    return tally


def concurrent_writers(db: str, model: Path, writers: int) -> tuple[int, int, int]:
    """(runs complete with all their rows, runs not, writers that failed)."""
    from sqlalchemy import create_engine, text

    from specprof.engine.store.urls import resolve_url

    command = [c for c in profile_command(model, db) if c != "--resume"]
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for _ in range(writers)]
    failed = 0
    for process in processes:
        _, error = process.communicate(timeout=900)
        if process.returncode != 0:
            failed += 1
            print(f"writer failed: {error.decode(errors='replace').strip()}", file=sys.stderr)
    engine = create_engine(resolve_url(db))
    try:
        with engine.connect() as connection:
            runs = list(connection.execute(text("select id, status from runs")))
            rows = list(connection.execute(text("select run_id, layer_id, backend from spectra")))
    finally:
        engine.dispose()
    per_run: dict[int, list[tuple[int, str]]] = {}
    for run_id, layer_id, backend in rows:
        per_run.setdefault(run_id, []).append((layer_id, backend))
    good = sum(1 for run_id, status in runs if status == "complete"
               and len(per_run.get(run_id, [])) == len(set(per_run.get(run_id, [])))
               == LAYERS * len(BACKENDS))
    return good, len(runs) - good, failed


def _admin(server: str, statement: str) -> None:
    from sqlalchemy import create_engine, text

    from specprof.engine.store.urls import resolve_url

    engine = create_engine(resolve_url(server), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(statement))
    finally:
        engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100, help="kill -9 count per database")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="specprof-durability-") as folder:
        return measure(args, rng, Path(folder))


def measure(args: argparse.Namespace, rng: random.Random, folder: Path) -> int:
    """Every round and the concurrent writers, with files in ``folder``; prints the table."""
    model = folder / "eight_convs.onnx"
    write_model(model)
    os.environ.setdefault("HOME", str(folder))
    results: dict[str, Tally] = {}
    started = time.perf_counter()
    sqlite_path = folder / "kills.db"
    results["sqlite"] = kill_rounds(f"sqlite:///{sqlite_path}", model, args.kills, rng,
                                    sqlite_path)
    writers = None
    if not args.no_postgres:
        name = f"specprof_durability_{os.getpid()}"
        base = args.postgres.rsplit("/", 1)[0]
        _admin(args.postgres, f"create database {name}")
        try:
            results["postgresql"] = kill_rounds(f"{base}/{name}", model, args.kills, rng, None)
        finally:
            _admin(args.postgres, f"drop database {name} with (force)")
        _admin(args.postgres, f"create database {name}")
        try:
            writers = concurrent_writers(f"{base}/{name}", model, args.writers)
        finally:
            _admin(args.postgres, f"drop database {name} with (force)")
    print(f"{'database':<12}{'rounds':>7}{'kills':>7}{'corrupt':>9}{'lost':>6}{'duplicated':>12}"
          f"{'half rows':>11}{'runs':>6}{'resumed to complete':>21}")
    for label, tally in results.items():
        corrupt = tally.corrupt_checks + tally.runs_corrupt
        print(f"{label:<12}{tally.rounds:>7}{tally.kills:>7}{corrupt:>9}{tally.lost:>6}{tally.duplicated:>12}"
              f"{tally.half_rows:>11}{tally.runs:>6}"
              f"{f'{tally.runs_complete}/{tally.runs}':>21}")
    if writers is not None:
        good, bad, failed = writers
        print(f"{args.writers} concurrent writers on postgresql: {good} runs complete with all "
              f"rows once, {bad} not, {failed} writers failed")
    print(f"kill -9 {args.kills} times per database, model of {LAYERS} layers x {len(BACKENDS)} "
          f"backends, {time.perf_counter() - started:.0f} s")
    bad_total = sum(t.corrupt_checks + t.runs_corrupt + t.lost + t.duplicated + t.half_rows
                    for t in results.values())
    return 1 if bad_total or (writers is not None and (writers[1] or writers[2])) else 0


if __name__ == "__main__":
    sys.exit(main())
