"""The Python API behind ``import specprof``: load, profile, query, singular values.

Each function opens what it needs (plugins, store) and closes it again, so that calls are
independent; pass ``db=`` to choose the database (default: the per-user SQLite file).
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from specprof.engine.errors import BackendError, SpecprofError
from specprof.engine.limits import DEFAULT_MAX_SECONDS, parse_memory
from specprof.engine.loading import choose_importer
from specprof.engine.loading import load_model as _load_model
from specprof.engine.plugins import Registry, get_registry
from specprof.engine.profile import (
    AUTO,
    BoundaryChoice,
    Executor,
    ExecutorLost,
    InProcess,
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
                   "sigma_min", "n_values", "lower_bound", "upper_bound", "sigma_max_error",
                   "seconds", "reason"]


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
    """The per-layer table of a run, one row per (layer, backend).

    ``sigma_max_error``: how far the reported sigma_max can be from the true one, relative
    to it, from the backend's certified bracket [lower_bound, upper_bound] (the larger
    distance to either end); NaN where the backend gave no bracket (a value it computed
    exactly, or one with no certificate). A toeplitz approximation far off says: ask exact.
    """
    rows = []
    for outcome in outcomes:
        spectrum = outcome.spectrum
        sigma = spectrum.sigma_max if spectrum else math.nan
        lower = _bound(spectrum.lower_bound if spectrum else None)
        upper = _bound(spectrum.upper_bound if spectrum else None)
        error = (max(upper - sigma, sigma - lower) / sigma
                 if sigma > 0 and math.isfinite(lower) and math.isfinite(upper) else math.nan)
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
            "lower_bound": lower,
            "upper_bound": upper,
            "sigma_max_error": error,
            "seconds": spectrum.seconds if spectrum else 0.0,
            "reason": outcome.reason,
        })
    frame = pd.DataFrame(rows, columns=OUTCOME_COLUMNS)
    frame.attrs["run_id"] = run_id
    return frame


def profile(model: str | os.PathLike[str] | Any | Sequence[Any], *,
            backend: str | Sequence[str] = AUTO,
            db: str | None = None, input_shape: str | Sequence[int] | None = None,
            boundary: BoundaryChoice = "model", device: str = "cpu", top_k: int | None = None,
            precision: str | None = None, max_dense: int = 4096, force: bool = False,
            resume: bool = False, prefer: str | Sequence[str] = (), format: str | None = None, model_class: str | None = None,
            name: str | None = None, on_layer: Callable[[LayerOutcome], None] | None = None,
            fold_batchnorm: bool = False, skip_unsupported: bool = False,
            workers: int | None = None, scheduler: str | None = None,
            executor: Executor | None = None, max_memory: int | str | None = None,
            max_seconds: float | None = DEFAULT_MAX_SECONDS) -> pd.DataFrame:
    """Profile every linear layer of ``model`` and store the run; returns the per-layer table.

    ``backend`` is a name, a comma-separated list or a sequence of names (``auto`` picks per
    layer). The run's id is in ``frame.attrs["run_id"]``. Spectra already stored for the same
    layer content, backend and parameters are reused unless ``force``; ``resume`` continues the
    last interrupted run of this model and configuration instead of starting a new one.
    ``prefer`` names backends ``auto`` tries first where they support a layer; ``device``
    is cpu, cuda, cuda:N or auto (resolved once, here). ``fold_batchnorm`` and
    ``skip_unsupported`` are passed to ``load_model``.

    ``model`` may be a list (or tuple) of models: paths, folders of model files, globs, or
    objects. Each is its own run; one that fails does not stop the others. The tables are then
    concatenated behind a ``model`` column (the source as given or found), with
    ``frame.attrs["runs"]`` ({source: run id}) and ``frame.attrs["errors"]`` ({source: the
    one-line error} for each model that failed).

    The layers are computed in this process unless ``workers`` (a local Dask cluster of that
    many worker processes), ``scheduler`` (a Dask scheduler address; default
    ``$SPECPROF_SCHEDULER``) or an ``executor`` from ``open_executor`` says otherwise; this
    process always plans and writes the results.

    ``max_memory`` (bytes, or a size such as ``"8G"``; default: a share of the available
    memory) and ``max_seconds`` (estimated, for approximate backends) limit one layer: a backend
    over them is not run on it (``specprof.engine.limits``).

    ``precision`` (float64 or float32) defaults per model: float32 for weights-only checkpoints
    (safetensors, GGUF, state dicts, LoRA), float64 for graph models.
    """
    config = ProfileConfig(backends=_names(backend), boundary=boundary, device=device,
                           top_k=top_k, precision=precision or "float64",  # type: ignore[arg-type]
                           max_dense=max_dense, force=force, resume=resume,
                           prefer=_names(prefer),
                           max_memory=parse_memory(max_memory) if isinstance(max_memory, str)
                           else max_memory, max_seconds=max_seconds)
    registry = get_registry()
    validate_backends(config.backends, registry, config.prefer)  # before a possibly slow import
    models = list(model) if isinstance(model, list | tuple) else None
    if models is not None and name is not None and len(models) != 1:
        raise SpecprofError("name= names one model, and several were given",
                            "leave name out: each model is stored under its file name")
    load = partial(load_model, format=format, input_shape=input_shape, model_class=model_class,
                   name=name, registry=registry, fold_batchnorm=fold_batchnorm,
                   skip_unsupported=skip_unsupported)
    if models is None:
        loaded = load(model)  # a model that can't be read leaves the database untouched
        with _executor(executor, workers, scheduler, config.device) as chosen, \
                Store.open(db) as store:
            result = profile_model(loaded, _limited(with_precision(config, loaded, precision),
                                                    chosen, max_memory),
                                   store, registry, on_layer=on_layer, executor=chosen)
        return outcomes_frame(result.run_id, result.outcomes)
    sources = model_sources(models, registry, format)
    with _executor(executor, workers, scheduler, config.device) as chosen, \
            Store.open(db) as store:
        return _profile_each(sources, load, _limited(config, chosen, max_memory), store,
                             registry, on_layer, chosen, precision)


def with_precision(config: ProfileConfig, loaded: LoadedModel, asked: str | None
                   ) -> ProfileConfig:
    """``config`` with the model's default precision when none was ``asked``: float32 for a
    weights-only checkpoint (no graph: LAPACK-scale matrices, float32 on disk), else float64."""
    if asked is not None:
        return config
    return replace(config, precision="float32" if loaded.proto is None else "float64")


def _limited(config: ProfileConfig, executor: Executor, asked: Any) -> ProfileConfig:
    """``config`` with the executor's memory per task as the limit (workers elsewhere hold
    what they hold, not what this machine has free), unless the caller set one."""
    limit = executor.memory_limit()
    return config if asked is not None or limit is None else replace(config, max_memory=limit)


def _executor(executor: Executor | None, workers: int | None, scheduler: str | None,
              device: str) -> contextlib.AbstractContextManager[Executor]:
    if executor is not None:
        if workers is not None or scheduler is not None:
            raise SpecprofError("executor= given with workers= or scheduler=",
                                "pass one way to run the layers")
        return contextlib.nullcontext(executor)
    from specprof.engine.distributed import open_executor

    return open_executor(workers, scheduler, device)


def _profile_each(sources: list[Any], load: Callable[[Any], LoadedModel], config: ProfileConfig,
                  store: Store, registry: Registry,
                  on_layer: Callable[[LayerOutcome], None] | None,
                  executor: Executor, precision: str | None = None) -> pd.DataFrame:
    """One run per model, in order; a model that fails is noted and the others go on. A lost
    executor (Dask scheduler gone) stops them all: nothing could compute the rest."""
    frames, runs, errors = [], {}, {}
    for source, loaded in loaded_models(sources, load, ahead=not isinstance(executor, InProcess)):
        label = source_label(source)
        try:
            if isinstance(loaded, SpecprofError):
                raise loaded
            result = profile_model(loaded, with_precision(config, loaded, precision), store,
                                   registry, on_layer=on_layer, executor=executor)
        except ExecutorLost:
            raise
        except SpecprofError as error:
            errors[label] = error.one_line()
            continue
        frame = outcomes_frame(result.run_id, result.outcomes)
        frame.insert(0, "model", label)
        frames.append(frame)
        runs[label] = result.run_id
    columns = ["model", *OUTCOME_COLUMNS]
    joined = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    joined.attrs.update(runs=runs, errors=errors)
    return joined


def loaded_models(sources: Sequence[Any], load: Callable[[Any], LoadedModel], ahead: bool = False
                  ) -> Iterator[tuple[Any, LoadedModel | SpecprofError]]:
    """Each source with its loaded model, or the ``SpecprofError`` loading it raised.

    With ``ahead`` the next model is loaded on a thread while the caller profiles this one:
    worth it when the layers are computed elsewhere (on Dask workers), so that they need not
    wait for the next model to be read. At most two models are in memory then.
    """
    def attempt(source: Any) -> LoadedModel | SpecprofError:
        try:
            return load(source)
        except SpecprofError as error:
            return error

    if not ahead:
        for source in sources:
            yield source, attempt(source)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="specprof-load") as pool:
        upcoming = pool.submit(attempt, sources[0]) if sources else None
        for position, source in enumerate(sources):
            assert upcoming is not None
            loaded = upcoming.result()
            following = position + 1
            upcoming = pool.submit(attempt, sources[following]) if following < len(sources) else None
            yield source, loaded


def source_label(source: Any) -> str:
    """How a model is named in a multi-model table: its path, or its object's type."""
    if isinstance(source, str | os.PathLike):
        return str(source)
    return f"<{type(source).__name__}>"


GLOB_CHARS = frozenset("*?[")


def model_sources(sources: Sequence[Any], registry: Registry | None = None,
                  format: str | None = None) -> list[Any]:
    """The models named by ``sources``, in order: a glob (``zoo/*.onnx``, also when the shell
    left it quoted) becomes the paths it matches, sorted; a folder that no importer takes as
    one model (as it takes a sharded checkpoint) becomes the model files in it, sorted; any
    other path or object is itself. A glob that matches nothing stays as given, so that
    loading it says so."""
    registry = registry or get_registry()
    found: list[Any] = []
    for source in sources:
        if not isinstance(source, str | os.PathLike):
            found.append(source)
            continue
        path = Path(source)
        if not path.exists() and GLOB_CHARS & set(str(source)):
            found.extend(sorted(glob.glob(str(source))) or [source])
        elif path.is_dir() and format is None and not _is_one_model(path, registry):
            found.extend(_model_files(path, registry) or [source])
        else:
            found.append(source)
    return found


def _is_one_model(folder: Path, registry: Registry) -> bool:
    try:
        choose_importer(folder, registry)
    except SpecprofError:
        return False
    return True


def _model_files(folder: Path, registry: Registry) -> list[str]:
    """The files directly in ``folder`` whose name ends in a suffix some importer claims."""
    suffixes = tuple(suffix.lower() for cls in registry.importers.values()
                     for suffix in cls.suffixes)
    return sorted(str(child) for child in folder.iterdir()
                  if not child.name.startswith(".") and child.is_file()
                  and child.name.lower().endswith(suffixes))


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
