"""``specprof compare``: several backends on the same layers, measured against ``exact``.

Every backend is asked the user's question (each layer's own padding by default, the boundary
given otherwise; top-k). Where a backend cannot answer it for a layer, like ``fft-circulant``
under zero padding, it is asked once more on the other boundary (a second run): the circular
spectrum is the approximation it stands for. Those rows are marked ``fallback``, so their error
against the zero-padded truth reads for what it is: the boundary effect.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from specprof.engine.plugins import Registry
from specprof.engine.profile import LayerOutcome, ProfileConfig, profile_model
from specprof.engine.store import Store
from specprof.engine.types import LoadedModel, Spectrum

TRUTH = "exact"
COLUMNS = ["index", "layer", "shape", "backend", "boundary", "fallback", "status", "sigma_max",
           "rel_error", "spectrum_error", "lower_bound", "upper_bound", "brackets", "seconds",
           "run", "reason"]


def compare_backends(model: LoadedModel, config: ProfileConfig, store: Store,
                     registry: Registry,
                     on_layer: Callable[[LayerOutcome], None] | None = None) -> pd.DataFrame:
    """Run ``config.backends`` on every layer and return one row per (layer, backend).

    ``fallback`` marks rows answered on the other boundary than the one asked.
    """
    asked = {layer.index: config.request(layer).boundary for layer in model.layers}
    result = profile_model(model, config, store, registry, on_layer=on_layer)
    outcomes = {(o.layer.index, o.backend): (o, result.run_id, False) for o in result.outcomes}
    refused = sorted({o.backend for o in result.outcomes if o.status == "skipped"},
                     key=config.backends.index)
    if refused and config.top_k is None:
        other = replace(config, backends=tuple(refused),
                        boundary="zeros" if config.boundary == "circular" else "circular")
        second = profile_model(model, other, store, registry, on_layer=on_layer)
        for o in second.outcomes:
            key = (o.layer.index, o.backend)
            flipped = other.request(o.layer).boundary != asked[o.layer.index]
            if flipped and outcomes[key][0].status == "skipped" and o.status != "skipped":
                outcomes[key] = (o, second.run_id, True)
    truth = {o.layer.index: o.spectrum for o, _, fallback in outcomes.values()
             if o.backend == TRUTH and o.spectrum is not None and not fallback}
    rows = [_row(o, run_id, fallback, asked[o.layer.index], truth.get(o.layer.index))
            for o, run_id, fallback in outcomes.values()]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.sort_values(["index", "backend"], kind="stable").reset_index(drop=True)


def spectrum_error(approx: Spectrum, truth: Spectrum) -> float:
    """Mean |approx_i - true_i| / true sigma_max over all values, sorted; NaN if counts differ."""
    a, t = approx.expanded(), truth.expanded()
    if a.size != t.size or t.size == 0 or t[0] == 0:
        return math.nan
    return float(np.mean(np.abs(a - t)) / t[0])


def _row(outcome: LayerOutcome, run_id: int, fallback: bool, asked: str,
         truth: Spectrum | None) -> dict[str, Any]:
    boundary = ("circular" if asked == "zeros" else "zeros") if fallback else asked
    spectrum = outcome.spectrum
    row: dict[str, Any] = {
        "index": outcome.layer.index, "layer": outcome.layer.name,
        "shape": outcome.layer.describe(), "backend": outcome.backend,
        "boundary": boundary if outcome.layer.is_conv else None, "fallback": fallback,
        "status": outcome.status,
        "run": run_id, "reason": outcome.reason,
    }
    if spectrum is None:
        return row
    row.update(sigma_max=spectrum.sigma_max, seconds=spectrum.seconds,
               lower_bound=spectrum.lower_bound, upper_bound=spectrum.upper_bound)
    if truth is not None:
        top = truth.sigma_max
        row["rel_error"] = abs(spectrum.sigma_max - top) / top if top else math.nan
        row["spectrum_error"] = spectrum_error(spectrum, truth)
        if spectrum.lower_bound is not None or spectrum.upper_bound is not None:
            low = -math.inf if spectrum.lower_bound is None else spectrum.lower_bound
            high = math.inf if spectrum.upper_bound is None else spectrum.upper_bound
            slack = 1e-10 * top
            row["brackets"] = bool(low - slack <= top <= high + slack)
    return row
