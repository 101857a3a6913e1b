"""Profiling a model: plan a backend per layer, compute, and stream each result to the store.

A run is recorded before the first layer and closed after the last. Each layer's result is its
own transaction, so a run interrupted at any point keeps every layer it finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final, Literal

from specprof.engine.base import Backend
from specprof.engine.errors import SpecprofError
from specprof.engine.plugins import Registry
from specprof.engine.store import Store
from specprof.engine.types import Layer, LoadedModel, Request, Spectrum, resolve_device

AUTO = "auto"
MODEL_BOUNDARY: Final = "model"
BoundaryChoice = Literal["model", "zeros", "circular"]
"""``model``: each layer's own padding (zeros, or circular where the model wraps)."""
Status = Literal["ok", "reused", "skipped", "failed"]


def split_names(text: str | None) -> tuple[str, ...]:
    """``"exact, toeplitz"`` -> ``("exact", "toeplitz")``; None or '' -> ``()``."""
    return tuple(name.strip() for name in (text or "").split(",") if name.strip())


@dataclass(frozen=True)
class ProfileConfig:
    """What the user asked for; stored with the run."""

    backends: tuple[str, ...] = (AUTO,)
    boundary: BoundaryChoice = MODEL_BOUNDARY
    device: str = "cpu"
    top_k: int | None = None
    precision: Literal["float64", "float32"] = "float64"
    max_dense: int = 4096
    force: bool = False
    # Continue the newest interrupted/failed run of the same model and configuration (same
    # run id), computing only the (layer, backend) results it lacks.
    resume: bool = False
    prefer: tuple[str, ...] = ()
    """Backends ``auto`` tries first (``--prefer``), where they support the layer."""

    def __post_init__(self) -> None:
        # Resolved once here, so every backend and every layer of a run sees one device.
        object.__setattr__(self, "device", resolve_device(self.device))
        object.__setattr__(self, "prefer", tuple(self.prefer))

    def request(self, layer: Layer | None = None) -> Request:
        """The question for the backends; with ``boundary="model"`` each layer's own padding."""
        boundary = self.boundary
        if boundary == MODEL_BOUNDARY:
            boundary = layer.padding_mode if layer is not None else "zeros"
        return Request(boundary=boundary, device=self.device,  # type: ignore[arg-type]
                       top_k=self.top_k, precision=self.precision, max_dense=self.max_dense,
                       prefer=self.prefer)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["backends"] = list(self.backends)
        del data["resume"]  # how the run was started, not what it computes
        if self.prefer:
            data["prefer"] = list(self.prefer)
        else:
            del data["prefer"]  # runs stored before --prefer existed compare equal
        return data


@dataclass(frozen=True)
class LayerOutcome:
    """One (layer, backend) result of a run, as shown in the per-layer table."""

    layer: Layer
    backend: str
    status: Status
    spectrum: Spectrum | None = None
    reason: str = ""


@dataclass
class ProfileResult:
    run_id: int
    model: LoadedModel
    outcomes: list[LayerOutcome] = field(default_factory=list)


def validate_backends(names: tuple[str, ...], registry: Registry,
                      prefer: tuple[str, ...] = ()) -> None:
    """Fail before anything is stored when a named backend is unknown or unavailable."""
    if not names:
        raise SpecprofError("no backend given", "use --backend auto or a name from 'specprof backends'")
    for name in names:
        if name != AUTO:
            registry.backend(name)
    for name in prefer:  # names only: 'auto' is what --prefer orders, not a backend
        if name not in registry.backends:
            raise SpecprofError(f"unknown backend '{name}' in --prefer",
                                f"choose from: {', '.join(sorted(registry.backends))}")
        registry.backend(name)


def choose_backend(layer: Layer, request: Request, name: str,
                   registry: Registry) -> tuple[Backend | None, str]:
    """The backend to run on ``layer`` and why; (None, reason) when none can."""
    if name != AUTO:
        backend = registry.backend(name)
        support = backend.supports(layer, request)
        return (backend, support.reason) if support else (None, support.reason)
    candidates = {n: b for n, b in registry.available_backends().items() if b.kind == "operator"}
    for preferred in request.prefer:  # a preferred backend of another kind, e.g. filter
        backend = registry.backend(preferred)
        if backend.supports(layer, request):
            return backend, f"preferred (--prefer {preferred})"
    answer = registry.pm.hook.specprof_select_backend(layer=layer, request=request,
                                                      backends=candidates)
    if answer is None:
        reasons = "; ".join(f"{n}: {b.supports(layer, request).reason}"
                            for n, b in candidates.items())
        return None, f"no backend can handle this layer ({reasons or 'none installed'})"
    chosen, reason = answer
    return candidates[chosen], reason


def compute_spectrum(backend: Backend, layer: Layer, request: Request) -> Spectrum:
    """Run the backend and label the result with what identifies it in the store.

    The request's parameters are merged over the backend's own (a backend's ``method`` stays
    on record, the request's keys win); the wall time is filled in if the backend left it.
    Whether the values are all of them (``complete``) is the backend's to say: the
    conformance suite checks that a top-k answer says it is partial.
    """
    started = time.perf_counter()
    spectrum = backend.compute(layer, request)
    return replace(spectrum, params={**spectrum.params, **request.params()},
                   seconds=spectrum.seconds or time.perf_counter() - started)


def profile_model(
    model: LoadedModel,
    config: ProfileConfig,
    store: Store,
    registry: Registry,
    on_layer: Callable[[LayerOutcome], None] | None = None,
) -> ProfileResult:
    """Profile every layer of ``model`` with every requested backend, storing as it goes.

    Results already stored for the same layer content, backend and parameters are reused
    unless ``config.force``. A layer a backend can't handle is recorded as skipped with the
    reason; a layer whose computation fails (e.g. NaN weights) is recorded as failed, and the
    run goes on.
    """
    validate_backends(config.backends, registry, config.prefer)
    model_id, layer_ids = store.add_model(model)
    run_id, done = _start_or_resume(model_id, {"model": model.name, **config.to_json()}, config,
                                    store)
    result = ProfileResult(run_id, model)
    try:
        for layer, layer_id in zip(model.layers, layer_ids, strict=True):
            request = config.request(layer)
            for name in config.backends:
                outcome = _resumed_outcome(layer, layer_id, name, request, done, store, registry,
                                           run_id)
                if outcome is None:
                    outcome = _profile_layer(layer, layer_id, name, request, config, store,
                                             registry, run_id)
                result.outcomes.append(outcome)
                if on_layer is not None:
                    on_layer(outcome)
    except KeyboardInterrupt:
        store.finish_run(run_id, "interrupted", "interrupted by the user")
        raise
    except BaseException as error:
        store.finish_run(run_id, "failed", f"{type(error).__name__}: {error}")
        raise
    store.finish_run(run_id, "complete")
    return result


def _start_or_resume(model_id: int, run_config: dict[str, Any], config: ProfileConfig,
                     store: Store) -> tuple[int, dict[tuple[int, str], tuple[str, int]]]:
    """A new run, or with ``config.resume`` the run to continue and what it already holds."""
    if config.resume:
        run_id = store.resumable_run(model_id, run_config)
        if run_id is not None:
            store.reopen_run(run_id)
            return run_id, store.run_results(run_id)
    return store.start_run(model_id, run_config), {}


def _resumed_outcome(layer: Layer, layer_id: int, name: str, request: Request,
                     done: dict[tuple[int, str], tuple[str, int]], store: Store,
                     registry: Registry, run_id: int) -> LayerOutcome | None:
    """The outcome of a (layer, backend) the resumed run already stored; None if it has none.

    Every result row was written in its own transaction, so one that exists is complete.
    """
    if not done:
        return None
    backend, reason = choose_backend(layer, request, name, registry)
    label = backend.name if backend is not None else name
    if (layer_id, label) not in done:
        return None
    status, row_id = done[(layer_id, label)]
    if status != "ok":
        return LayerOutcome(layer, label, status, reason=reason)  # type: ignore[arg-type]
    spectrum = store.load_spectrum(row_id)
    registry.pm.hook.specprof_layer_done(run_id=run_id, layer=layer, spectrum=spectrum,
                                         reused=True)
    return LayerOutcome(layer, label, "reused", spectrum, "already stored by this run")


def _profile_layer(layer: Layer, layer_id: int, name: str, request: Request,
                   config: ProfileConfig, store: Store, registry: Registry,
                   run_id: int) -> LayerOutcome:
    backend, reason = choose_backend(layer, request, name, registry)
    label = backend.name if backend is not None else name
    if backend is None:
        store.add_layer_result(run_id, layer_id, label, None, "skipped", reason)
        return LayerOutcome(layer, label, "skipped", reason=reason)
    if not config.force:
        stored = store.find_spectrum(layer.content_hash, backend.name, request.params())
        if stored is not None:
            store.add_spectrum(run_id, layer_id, stored)
            registry.pm.hook.specprof_layer_done(run_id=run_id, layer=layer, spectrum=stored,
                                                 reused=True)
            return LayerOutcome(layer, label, "reused", stored, "already stored")
    try:
        spectrum = compute_spectrum(backend, layer, request)
    except (SpecprofError, ArithmeticError, ValueError, MemoryError) as error:
        message = error.one_line() if isinstance(error, SpecprofError) else f"{type(error).__name__}: {error}"
        store.add_layer_result(run_id, layer_id, label, backend.kind, "failed", message)
        return LayerOutcome(layer, label, "failed", reason=message)
    store.add_spectrum(run_id, layer_id, spectrum)
    registry.pm.hook.specprof_layer_done(run_id=run_id, layer=layer, spectrum=spectrum,
                                         reused=False)
    return LayerOutcome(layer, label, "ok", spectrum, reason)
