"""``make fuzz``: the fuzz targets over many seeded cases, with a time and memory limit per
case, printing a table of outcomes (accepted, clean error, traceback, hang, memory).

    python -m tests.fuzz.run [--cases 10000] [--seconds 20] [--memory-gb 4]

Cases are split evenly over the targets; seeds start at 1,000,000 so they do not repeat the
default suite's. Any traceback, hang or memory blow-up is listed with its seed to reproduce.
"""

from __future__ import annotations

import argparse
import resource
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

FIRST_SEED = 1_000_000


class Hang(Exception):
    """A case ran past its time limit."""


def _alarm(_signum: int, _frame: Any) -> None:
    raise Hang


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seconds", type=int, default=20, help="time limit per case")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="address-space limit")
    args = parser.parse_args()

    import onnx

    from specprof.engine.loading import load_model
    from specprof.engine.plugins import get_registry
    from specprof.engine.profile import ProfileConfig, profile_model
    from specprof.engine.store import Store
    from specprof.testing import small_onnx_model
    from tests.fuzz import targets

    folder = Path(tempfile.mkdtemp(prefix="specprof-fuzz-"))
    onnx.save(small_onnx_model(), folder / "small.onnx")
    store = Store.open(str(folder / "fuzz.db"))
    run = profile_model(load_model(folder / "small.onnx"), ProfileConfig(backends=("exact",)),
                        store, get_registry()).run_id
    document = store.export_run(run)
    bases = targets.checkpoint_bases()
    limit = int(args.memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGALRM, _alarm)
    runs: dict[str, Any] = {
        "onnx file": lambda seed: targets.load_onnx(folder, seed),
        "checkpoint file": lambda seed: targets.load_checkpoint(folder, bases, seed),
        "export document": lambda seed: targets.import_export(store, document, seed),
        "query parameters": lambda seed: targets.query(store, seed),
    }
    table: dict[str, Counter[str]] = {name: Counter() for name in runs}
    problems: list[str] = []
    started = time.perf_counter()
    per_target = max(1, args.cases // len(runs))
    for name, run_case in runs.items():
        for seed in range(FIRST_SEED, FIRST_SEED + per_target):
            signal.alarm(args.seconds)
            try:
                outcome, detail = run_case(seed)
            except Hang:
                outcome, detail = "hang", f"over {args.seconds} s"
            except MemoryError:
                outcome, detail = "memory", f"over {args.memory_gb} GB"
            finally:
                signal.alarm(0)
            table[name][outcome] += 1
            if outcome not in ("ok", "clean"):
                problems.append(f"{name} seed {seed}: {outcome}: {detail}")
    seconds = time.perf_counter() - started
    columns = ("ok", "clean", "traceback", "hang", "memory")
    print(f"{'target':<18}" + "".join(f"{c:>11}" for c in columns) + f"{'cases':>9}")
    for name, counts in table.items():
        print(f"{name:<18}" + "".join(f"{counts[c]:>11}" for c in columns)
              + f"{sum(counts.values()):>9}")
    print(f"{per_target * len(runs)} cases in {seconds:.0f} s; ok = accepted, clean = one-line "
          "SpecprofError")
    for line in problems[:50]:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
