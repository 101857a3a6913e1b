"""The Python API behind ``import specprof``: load, profile, query, singular values.

Each function opens what it needs (plugins, store) and closes it again, so that calls are
independent; pass ``db=`` to choose the database (default: the per-user SQLite file).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from specprof.engine.errors import BackendError
from specprof.engine.loading import load_model as _load_model
from specprof.engine.plugins import Registry, get_registry
from specprof.engine.profile import (
    AUTO,
    BoundaryChoice,
    LayerOutcome,
    ProfileConfig,
    choose_backend,
    compute_spectrum,
    profile_model,
    split_names,
    validate_backends,
)
from specprof.engine.store import Store, load_spectrum
from specprof.engine.types import Layer, LoadedModel, Spectrum

__all__ = ["load_model", "load_spectrum", "profile", "query", "singular_values"]

OUTCOME_COLUMNS = ["run", "index", "layer", "op_type", "shape", "backend", "status", "sigma_max",
                   "sigma_min", "n_values", "lower_bound", "upper_bound", "seconds", "reason"]


def _names(names: str | Sequence[str]) -> tuple[str, ...]:
    return split_names(names) if isinstance(names, str) else tuple(names)


def load_model(source: str | os.PathLike[str] | Any, *, format: str | None = None,
               input_shape: str | Sequence[int] | None = None, model_class: str | None = None,
               name: str | None = None, registry: Registry | None = None,
               fold_batchnorm: bool = False, skip_unsupported: bool = False) -> LoadedModel:
    """Import a model (file path or framework object) and extract its linear layers.

    ``fold_batchnorm``: fold a BatchNormalization after a Conv/ConvTranspose/Gemm into it.
    ``skip_unsupported``: go on with the layers that can be extracted where part fails.
    """
    if isinstance(source, LoadedModel):
        return source
    return _load_model(source, format=format, input_shape=input_shape,
                       model_class=model_class, registry=registry or get_registry(),
                       name=name, fold_batchnorm=fold_batchnorm,
                       skip_unsupported=skip_unsupported)


def _bound(value: float | None) -> float:
    return math.nan if value is None else float(value)


def outcomes_frame(run_id: int, outcomes: Sequence[LayerOutcome]) -> pd.DataFrame:
    """The per-layer table of a run, one row per (layer, backend)."""
    rows = []
    for outcome in outcomes:
        spectrum = outcome.spectrum
        rows.append({
            "run": run_id,
            "index": outcome.layer.index,
            "layer": outcome.layer.name,
            "op_type": outcome.layer.op_type,
            "shape": outcome.layer.describe(),
            "backend": outcome.backend,
            "status": outcome.status,
            "sigma_max": spectrum.sigma_max if spectrum else math.nan,
            "sigma_min": spectrum.sigma_min if spectrum else math.nan,
            "n_values": spectrum.n_values if spectrum else 0,
            "lower_bound": _bound(spectrum.lower_bound if spectrum else None),
            "upper_bound": _bound(spectrum.upper_bound if spectrum else None),
            "seconds": spectrum.seconds if spectrum else 0.0,
            "reason": outcome.reason,
        })
    frame = pd.DataFrame(rows, columns=OUTCOME_COLUMNS)
    frame.attrs["run_id"] = run_id
    return frame


def profile(model: str | os.PathLike[str] | Any, *, backend: str | Sequence[str] = AUTO,
            db: str | None = None, input_shape: str | Sequence[int] | None = None,
            boundary: BoundaryChoice = "model", device: str = "cpu", top_k: int | None = None,
            precision: str = "float64", max_dense: int = 4096, force: bool = False,
            resume: bool = False, prefer: str | Sequence[str] = (), format: str | None = None, model_class: str | None = None,
            name: str | None = None, on_layer: Callable[[LayerOutcome], None] | None = None,
            fold_batchnorm: bool = False, skip_unsupported: bool = False) -> pd.DataFrame:
    """Profile every linear layer of ``model`` and store the run; returns the per-layer table.

    ``backend`` is a name, a comma-separated list or a sequence of names (``auto`` picks per
    layer). The run's id is in ``frame.attrs["run_id"]``. Spectra already stored for the same
    layer content, backend and parameters are reused unless ``force``; ``resume`` continues the
    last interrupted run of this model and configuration instead of starting a new one.
    ``prefer`` names backends ``auto`` tries first where they support a layer; ``device``
    is cpu, cuda, cuda:N or auto (resolved once, here). ``fold_batchnorm`` and
    ``skip_unsupported`` are passed to ``load_model``.
    """
    config = ProfileConfig(backends=_names(backend), boundary=boundary, device=device,
                           top_k=top_k, precision=precision,  # type: ignore[arg-type]
                           max_dense=max_dense, force=force, resume=resume,
                           prefer=_names(prefer))
    registry = get_registry()
    validate_backends(config.backends, registry, config.prefer)  # before a possibly slow import
    loaded = load_model(model, format=format, input_shape=input_shape, model_class=model_class,
                        name=name, registry=registry, fold_batchnorm=fold_batchnorm,
                        skip_unsupported=skip_unsupported)
    with Store.open(db) as store:
        result = profile_model(loaded, config, store, registry, on_layer=on_layer)
    return outcomes_frame(result.run_id, result.outcomes)


def query(*, db: str | None = None, model: str | None = None, layer: str | None = None,
          backend: str | None = None, kind: str | None = None, run: int | None = None,
          values: bool = False, where: str | None = None, sort: str | None = None,
          limit: int | None = None) -> pd.DataFrame:
    """Stored spectra as a DataFrame, newest run first.

    ``model``/``layer`` are globs; ``where`` filters summary columns (``"sigma_max > 3 and
    stable_rank < 10"``); ``sort`` names a column (``-`` in front for descending).
    """
    with Store.open(db) as store:
        return store.query(model=model, layer=layer, backend=backend, kind=kind, run=run,
                           values=values, where=where, sort=sort, limit=limit)


def singular_values(layer: Layer, backend: str = AUTO, *, boundary: BoundaryChoice = "model",
                    device: str = "cpu", top_k: int | None = None,
                    max_dense: int = 4096) -> Spectrum:
    """Singular values of one layer, computed now and not stored.

    ``boundary="model"`` uses the layer's own padding (``layer.padding_mode``).
    """
    config = ProfileConfig(boundary=boundary, device=device, top_k=top_k, max_dense=max_dense)
    request = config.request(layer)
    chosen, reason = choose_backend(layer, request, backend, get_registry())
    if chosen is None:
        raise BackendError(f"layer {layer.name}: {reason}")
    return compute_spectrum(chosen, layer, request)
