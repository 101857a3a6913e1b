"""specprof beside WeightWatcher 0.7.7 on the same weights, timed side by side in one run.

Two cases, each printing both wall times and their ratio:

``resnet18``  A random-weight ResNet-18 (``benchmarks/resnets.py``) at 224x224.
              specprof: ``specprof profile resnet18.onnx`` with no flags (auto backend, all
              singular values, zero padding where the model pads), as a user runs it: a fresh
              process, a fresh database, process start and model load included.
              WeightWatcher: ``WeightWatcher(model=torch_model).analyze()`` in this process
              (the call only: its import and the model build are not counted).
              The issue's target: specprof within 3x of WeightWatcher.

``bert``      A BERT/MiniLM-shaped safetensors checkpoint (6 blocks, hidden 384, intermediate
              1536, vocab 30522, as sentence-transformers' all-MiniLM-L6-v2) whose matrices have
              heavy-tailed spectra, as trained ones do.
              specprof: ``specprof profile FOLDER`` then ``specprof analyze`` (alpha), two fresh
              processes. WeightWatcher: ``WeightWatcher(model=FOLDER).analyze()`` in this
              process. Prints the median |alpha difference| over the matrices both fit
              (issue target <= 0.15) and the speed ratio (target: specprof >= 4x faster).

WeightWatcher is never a dependency of specprof. Install it in its own venv that sees
specprof's packages, keeping specprof's torch::

    python3.11 -m venv /tmp/wwvenv
    .venv/bin/python -c "import site; print(f'import site; site.addsitedir({site.getsitepackages()[0]!r})')" \\
        > /tmp/wwvenv/lib/python3.11/site-packages/main_venv.pth
    /tmp/wwvenv/bin/pip install -c constraints.txt weightwatcher==0.7.7
    /tmp/wwvenv/bin/python benchmarks/peers.py [--case resnet18|bert|all]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
BERT = {"blocks": 6, "hidden": 384, "intermediate": 1536, "vocab": 30522, "positions": 512}


def specprof_command(*args: str) -> tuple[float, str]:
    """(wall seconds, stdout) of ``specprof ARGS`` in a fresh process (as a user types it)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "specprof", *args], capture_output=True,
                          text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"specprof {' '.join(args)} failed:\n{done.stderr}")
    return seconds, done.stdout


def weightwatcher_analyze(model: Any) -> tuple[float, Any]:
    """(seconds, details frame) of WeightWatcher's default analyze()."""
    try:
        import weightwatcher
    except ImportError:
        sys.exit("weightwatcher is not installed here: see this file's docstring")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    watcher = weightwatcher.WeightWatcher(model=model)
    start = time.perf_counter()
    details = watcher.analyze()
    return time.perf_counter() - start, details


def ratio_line(name: str, ours: float, theirs: float) -> str:
    return (f"{name}: specprof {ours:.2f} s   WeightWatcher {theirs:.2f} s   "
            f"specprof / WeightWatcher = {ours / theirs:.2f}x")


# --------------------------------------------------------------------------- ResNet-18


def resnet18_case(folder: Path) -> None:
    sys.path.insert(0, str(HERE))
    import resnets

    model = resnets.resnet18(seed=0).eval()
    onnx_path = resnets.export_onnx(model, folder / "resnet18.onnx")
    ours, _ = specprof_command("profile", str(onnx_path), "--db", str(folder / "r18.db"), "-q")
    theirs, _ = weightwatcher_analyze(model)
    print(ratio_line("ResNet-18 224x224, default profile vs analyze()", ours, theirs))
    print(f"  target: <= 3x   ({'met' if ours <= 3 * theirs else 'NOT met'})")


# --------------------------------------------------------------------------- BERT checkpoint


def heavy_tailed(rows: int, cols: int, rng: np.random.Generator, alpha: float) -> np.ndarray:
    """A matrix whose ESD has a power-law tail of exponent ~alpha above an MP bulk."""
    bulk = rng.standard_normal((rows, cols)) / math.sqrt(max(rows, cols))
    rank = min(rows, cols)
    u, _ = np.linalg.qr(rng.standard_normal((rows, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, rank)))
    # Pareto-distributed squared singular values: p(lambda) ~ lambda^-alpha.
    lam = (1.0 - rng.random(rank)) ** (-1.0 / (alpha - 1.0))
    spikes = (u * np.sqrt(lam * 0.5 / rank ** 0.5)) @ v.T
    return (bulk + spikes).astype(np.float32)


def bert_shapes() -> dict[str, tuple[int, ...]]:
    h, i = BERT["hidden"], BERT["intermediate"]
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (BERT["vocab"], h),
        "embeddings.position_embeddings.weight": (BERT["positions"], h),
        "embeddings.token_type_embeddings.weight": (2, h),
        "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,),
    }
    for b in range(BERT["blocks"]):
        p = f"encoder.layer.{b}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            shapes |= {p + name + ".weight": (h, h), p + name + ".bias": (h,)}
        shapes |= {p + "intermediate.dense.weight": (i, h), p + "intermediate.dense.bias": (i,),
                   p + "output.dense.weight": (h, i), p + "output.dense.bias": (h,),
                   p + "attention.output.LayerNorm.weight": (h,),
                   p + "output.LayerNorm.weight": (h,)}
    shapes |= {"pooler.dense.weight": (h, h), "pooler.dense.bias": (h,)}
    return shapes


def write_bert(folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for name, shape in bert_shapes().items():
        if len(shape) == 1:
            tensors[name] = np.ones(shape, dtype=np.float32)
        else:
            tensors[name] = heavy_tailed(*shape, rng, alpha=rng.uniform(2.5, 5.0))
    tensors["embeddings.position_ids"] = np.arange(BERT["positions"], dtype=np.int64)[None]
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", **BERT}))
    return tensors


def specprof_alphas(output: str) -> dict[str, float]:
    """layer name -> alpha from ``specprof analyze --format json``."""
    rows = json.loads(output)
    return {row["layer"]: row["alpha"] for row in rows
            if row.get("alpha") is not None and not math.isnan(row["alpha"])}


def bert_case(folder: Path) -> None:
    checkpoint = folder / "minilm"
    write_bert(checkpoint)
    db = folder / "bert.db"
    profile_s, table = specprof_command("profile", str(checkpoint), "--db", str(db), "-q",
                                        "--output-format", "json")
    run = str(json.loads(table)[0]["run"])
    # The stored run (no MODEL file: no shuffled-weights baseline, which analyze() skips too).
    analyze_s, output = specprof_command("analyze", "--db", str(db), "--run", run,
                                         "--format", "json", "-q")
    ours = profile_s + analyze_s
    theirs, details = weightwatcher_analyze(str(checkpoint))
    print(ratio_line("MiniLM-shaped safetensors, profile + analyze vs analyze()", ours, theirs))
    print(f"  specprof profile {profile_s:.2f} s + analyze {analyze_s:.2f} s; "
          f"target: specprof >= 4x faster ({'met' if 4 * ours <= theirs else 'NOT met'})")
    mine = specprof_alphas(output)
    fitted = [row for row in details.to_dict("records")
              if row.get("alpha") is not None and not math.isnan(row["alpha"])]
    print(f"  WeightWatcher fitted {len(fitted)} matrices, specprof {len(mine)}")
    differences = compare_alphas(mine, details)
    if differences:
        print(f"  alpha: median |specprof - WeightWatcher| = {statistics.median(differences):.3f} "
              f"(largest {max(differences):.3f}) over {len(differences)} matrices "
              "(target <= 0.15)")


def compare_alphas(mine: dict[str, float], details: Any) -> list[float]:
    """|alpha difference| per matrix, matched by WeightWatcher's layer name."""
    differences = []
    for row in details.to_dict("records"):
        name = str(row.get("name", ""))
        alpha = row.get("alpha")
        if alpha is None or math.isnan(alpha):
            continue
        match = [value for layer, value in mine.items()
                 if layer == name or layer.removesuffix(".weight") == name]
        if match:
            differences.append(abs(match[0] - float(alpha)))
    return differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["resnet18", "bert", "all"], default="all")
    args = parser.parse_args()
    os.environ.setdefault("SPECPROF_NORMALIZE_CACHE", "0")  # each run starts cold, as a first use
    with tempfile.TemporaryDirectory() as tmp:
        if args.case in ("resnet18", "all"):
            resnet18_case(Path(tmp))
        if args.case in ("bert", "all"):
            bert_case(Path(tmp))


if __name__ == "__main__":
    main()
