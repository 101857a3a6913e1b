"""specprof's spectral analyzer side by side with WeightWatcher on one small torch CNN.

WeightWatcher is an optional dev dependency, never a runtime one. Install it in its own venv
that sees specprof's packages, without letting it change torch::

    python3.11 -m venv /tmp/wwvenv
    /work/main/.venv/bin/python -c "import site; print(site.getsitepackages()[0])" \\
        > /tmp/wwvenv/lib/python3.11/site-packages/main_venv.pth
    echo "torch==2.13.0" > /tmp/c.txt && /tmp/wwvenv/bin/pip install -c /tmp/c.txt weightwatcher
    /tmp/wwvenv/bin/python benchmarks/weightwatcher_compare.py [--seed 0] [--size 16]

Prints, per layer: WeightWatcher's alpha (its conv ESD pools the kh x kw slices W[:, :, i, j]),
specprof's alpha on the filter SVD (reshape(W, c_out, -1)) and on the exact operator spectrum
(the convolution as the linear map it is on a size x size input). See docs/analysis.md.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from typing import Any


def small_cnn(seed: int) -> Any:
    """Three convolutions and a linear head, wide enough (>= 32 channels) for tail fits."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, padding=1, stride=2), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.LazyLinear(10),
    )


def weightwatcher_alphas(model: Any) -> list[dict[str, Any]]:
    import weightwatcher

    frame = weightwatcher.WeightWatcher(model=model).analyze(randomize=False, plot=False)
    return [{"ww_alpha": row.get("alpha"), "ww_n": row.get("num_evals"),
             "ww_layer": row.get("name")} for row in frame.to_dict("records")]


def specprof_alphas(model: Any, size: int, kind: str, backend: str) -> list[dict[str, Any]]:
    from specprof.engine import api
    from specprof.engine.base import AnalysisContext
    from specprof.engine.store import Store
    from specprof.plugins.analyzers.spectral import SpectralAnalyzer

    with tempfile.TemporaryDirectory() as folder:
        db = f"{folder}/specprof.db"
        frame = api.profile(model, backend=backend, db=db, input_shape=(3, size, size))
        with Store.open(db) as store:
            context = AnalysisContext(store, {"kind": kind, "store_results": False})
            rows = SpectralAnalyzer().analyze(context, int(frame.attrs["run_id"]))
    return [{f"{kind}_alpha": r["alpha"], f"{kind}_n": r["n_values"], "layer": r["layer"]}
            for r in rows.to_dict("records")]


def main() -> None:
    import pandas as pd
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=8, help="input height = width")
    parser.add_argument("--checkpoint", help="a state_dict to load into the CNN (trained weights)")
    args = parser.parse_args()
    model = small_cnn(args.seed)
    model(torch.zeros(1, 3, args.size, args.size))  # materialize the lazy linear layer
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, weights_only=True))
    model.eval()
    columns = [pd.DataFrame(specprof_alphas(model, args.size, "operator", "exact"))]
    try:
        columns.append(pd.DataFrame(specprof_alphas(model, args.size, "filter", "filter"))
                       .drop(columns=["layer"]))
    except Exception as error:  # the filter backend is optional here: say why it is missing
        print(f"filter spectra unavailable: {type(error).__name__}: {error}")
    try:
        columns.append(pd.DataFrame(weightwatcher_alphas(model)))
    except ImportError:
        print("weightwatcher is not installed: see this script's docstring")
    table = pd.concat(columns, axis=1)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: "" if math.isnan(v) else f"{v:.3f}"))


if __name__ == "__main__":
    main()
