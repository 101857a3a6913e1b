"""Profiling a model: plan a backend per layer, compute, and stream each result to the store.

A run is recorded before the first layer and closed after the last. Each layer's result is its
own transaction, so a run interrupted at any point keeps every layer it finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final, Literal, Protocol

from specprof.engine.base import Backend
from specprof.engine.errors import SpecprofError
from specprof.engine.limits import DEFAULT_MAX_SECONDS, default_max_memory, limit_refusal
from specprof.engine.plugins import Registry
from specprof.engine.store import Store
from specprof.engine.types import (
    Boundary,
    Layer,
    LoadedModel,
    Request,
    Spectrum,
    resolve_device,
)

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
    max_memory: int | None = None
    """Bytes one layer may take (``--max-memory``); None: a share of the available memory."""
    max_seconds: float | None = DEFAULT_MAX_SECONDS
    """Estimated seconds an approximate backend may take on one layer (``--max-seconds``)."""

    def __post_init__(self) -> None:
        # Resolved once here, so every backend and every layer of a run sees one device.
        object.__setattr__(self, "device", resolve_device(self.device))
        if self.max_memory is None:
            object.__setattr__(self, "max_memory", default_max_memory())
        object.__setattr__(self, "prefer", tuple(self.prefer))

    def request(self, layer: Layer | LayerSummary | None = None) -> Request:
        """The question for the backends; with ``boundary="model"`` each layer's own padding."""
        boundary = self.boundary
        if boundary == MODEL_BOUNDARY:
            boundary = layer.padding_mode if layer is not None else "zeros"
        return Request(boundary=boundary, device=self.device,  # type: ignore[arg-type]
                       top_k=self.top_k, precision=self.precision, max_dense=self.max_dense,
                       prefer=self.prefer, max_memory=self.max_memory,
                       max_seconds=self.max_seconds)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["backends"] = list(self.backends)
        for name in ("resume", "max_memory", "max_seconds"):
            del data[name]  # how the run was started, not what it computes
        if self.prefer:
            data["prefer"] = list(self.prefer)
        else:
            del data["prefer"]  # runs stored before --prefer existed compare equal
        return data


@dataclass(frozen=True)
class LayerSummary:
    """What a run's tables need of a ``Layer``, without its weights.

    A run's outcomes keep one of these per layer instead of the layer itself, so profiling a
    streamed checkpoint holds one tensor at a time, not every tensor it has seen.
    """

    name: str
    index: int
    op_type: str
    description: str
    is_conv: bool
    padding_mode: Boundary
    weight_shape: tuple[int, ...]
    content_hash: str
    block: int | None = None
    role: str = ""
    note: str = ""

    @classmethod
    def of(cls, layer: Layer) -> LayerSummary:
        return cls(name=layer.name, index=layer.index, op_type=layer.op_type,
                   description=layer.describe(), is_conv=layer.is_conv,
                   padding_mode=layer.padding_mode,
                   weight_shape=tuple(int(n) for n in layer.weight.shape),
                   content_hash=layer.content_hash, block=layer.block, role=layer.role,
                   note=layer.note)

    def describe(self) -> str:
        """As ``Layer.describe``, e.g. 'Conv 3x3 s2 g4 16->32 @8x8'."""
        return self.description


@dataclass(frozen=True)
class LayerOutcome:
    """One (layer, backend) result of a run, as shown in the per-layer table.

    ``spectrum`` is kept without its singular vectors (they are in the store).
    """

    layer: LayerSummary
    backend: str
    status: Status
    spectrum: Spectrum | None = None
    reason: str = ""


@dataclass
class ProfileResult:
    run_id: int
    model: LoadedModel
    outcomes: list[LayerOutcome] = field(default_factory=list)


@dataclass(frozen=True, eq=False)
class Task:
    """One (layer, backend) computation the planner hands to an executor: everything it
    needs (the layer's weights, the backend, the request), and where its result goes."""

    layer: Layer
    layer_id: int
    backend: Backend
    request: Request
    reason: str
    """Why ``backend`` was chosen (shown in the table)."""
    run_id: int


@dataclass(frozen=True)
class TaskResult:
    """What an executor brings back for a ``Task``: a spectrum, or why it failed."""

    spectrum: Spectrum | None
    error: str = ""


class Executor(Protocol):
    """Runs ``Task`` computations; the caller stores what comes back, one result at a time."""

    def refuse(self, task: Task) -> str | None:
        """Why this executor can't run ``task`` at all (a layer that fits no worker), or None."""

    def memory_limit(self) -> int | None:
        """The most memory one task may take where this executor runs it (bytes); None:
        this process's own limit applies."""

    def run(self, tasks: Iterable[Task]) -> Iterator[tuple[Task, TaskResult]]:
        """Every task with its result, in the order they finish. ``tasks`` is pulled lazily,
        so that a streamed model's layers are read only when there is room for them."""


class InProcess:
    """The default executor: each task computed here, when it is pulled, one at a time."""

    def refuse(self, task: Task) -> str | None:
        return None

    def memory_limit(self) -> int | None:
        return None

    def run(self, tasks: Iterable[Task]) -> Iterator[tuple[Task, TaskResult]]:
        for task in tasks:
            yield task, run_task(task.backend, task.layer, task.request)


def run_task(backend: Backend, layer: Layer, request: Request) -> TaskResult:
    """Compute one spectrum; a failure the layer causes (bad numbers, too big) is the result,
    not an exception, so that it is stored as a failed row and the run goes on."""
    try:
        return TaskResult(compute_spectrum(backend, layer, request))
    except (SpecprofError, ArithmeticError, ValueError, MemoryError) as error:
        message = (error.one_line() if isinstance(error, SpecprofError)
                   else f"{type(error).__name__}: {error}")
        return TaskResult(None, message)


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
        refusal = limit_refusal(backend, layer, request) if support else support.reason
        return (None, refusal) if refusal else (backend, support.reason)
    candidates = {n: b for n, b in registry.available_backends().items() if b.kind == "operator"}
    for preferred in request.prefer:  # a preferred backend of another kind, e.g. filter
        backend = registry.backend(preferred)
        if backend.supports(layer, request) and not limit_refusal(backend, layer, request):
            return backend, f"preferred (--prefer {preferred})"
    # Backends over the memory or time limits are not candidates (engine/limits.py).
    refused = {n: limit_refusal(b, layer, request) for n, b in candidates.items()
               if b.supports(layer, request)}
    answer = registry.pm.hook.specprof_select_backend(
        layer=layer, request=request,
        backends={n: b for n, b in candidates.items() if not refused.get(n)})
    if answer is None:
        reasons = "; ".join(f"{n}: {refused.get(n) or b.supports(layer, request).reason}"
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


class ExecutorLost(SpecprofError):
    """The executor went away mid-run (a Dask scheduler gone): the run is left interrupted."""


def profile_model(
    model: LoadedModel,
    config: ProfileConfig,
    store: Store,
    registry: Registry,
    on_layer: Callable[[LayerOutcome], None] | None = None,
    executor: Executor | None = None,
) -> ProfileResult:
    """Profile every layer of ``model`` with every requested backend, storing as it goes.

    Results already stored for the same layer content, backend and parameters are reused
    unless ``config.force``. A layer a backend can't handle is recorded as skipped with the
    reason; a layer whose computation fails (e.g. NaN weights) is recorded as failed, and the
    run goes on. The computations run on ``executor`` (default: here, one after the other);
    whatever the executor, this process plans, and writes each result in its own transaction
    as it arrives. The outcomes come back in layer order, then backend order.
    """
    validate_backends(config.backends, registry, config.prefer)
    model_id, layer_ids = store.add_model(model)
    run_id, done = _start_or_resume(model_id, {"model": model.name, **config.to_json()}, config,
                                    store)
    run = _Run(run_id, config, store, registry, on_layer, done)
    executor = executor if executor is not None else InProcess()
    try:
        for task, task_result in executor.run(run.plan(model.layers, layer_ids, executor)):
            run.record(task, task_result)
    except KeyboardInterrupt:
        store.finish_run(run_id, "interrupted", "interrupted by the user")
        raise
    except ExecutorLost as error:
        store.finish_run(run_id, "interrupted", error.one_line())
        raise
    except BaseException as error:
        store.finish_run(run_id, "failed", f"{type(error).__name__}: {error}")
        raise
    store.finish_run(run_id, "complete")
    return ProfileResult(run_id, model, [outcome for _, outcome in sorted(
        run.outcomes, key=lambda pair: pair[0])])


def _start_or_resume(model_id: int, run_config: dict[str, Any], config: ProfileConfig,
                     store: Store) -> tuple[int, dict[tuple[int, str], tuple[str, int]]]:
    """A new run, or with ``config.resume`` the run to continue and what it already holds."""
    if config.resume:
        run_id = store.resumable_run(model_id, run_config)
        if run_id is not None:
            store.reopen_run(run_id)
            return run_id, store.run_results(run_id)
    return store.start_run(model_id, run_config), {}


class _Run:
    """One run being profiled: plans its tasks, stores what needs no computing at once, and
    stores each computed result when it comes back."""

    def __init__(self, run_id: int, config: ProfileConfig, store: Store, registry: Registry,
                 on_layer: Callable[[LayerOutcome], None] | None,
                 done: dict[tuple[int, str], tuple[str, int]]) -> None:
        self.run_id, self.config, self.store, self.registry = run_id, config, store, registry
        self.on_layer, self.done = on_layer, done
        self.outcomes: list[tuple[tuple[int, int], LayerOutcome]] = []
        self._slots: dict[int, tuple[int, int]] = {}  # id(task) -> (layer position, backend)

    def plan(self, layers: Iterable[Layer], layer_ids: list[int],
             executor: Executor) -> Iterator[Task]:
        """The tasks that need computing, one layer at a time (read when pulled)."""
        for position, (layer, layer_id) in enumerate(zip(layers, layer_ids, strict=True)):
            request = self.config.request(layer)
            for which, name in enumerate(self.config.backends):
                task = self._plan_one(layer, layer_id, name, request, (position, which),
                                      executor)
                if task is not None:
                    yield task

    def _plan_one(self, layer: Layer, layer_id: int, name: str, request: Request,
                  slot: tuple[int, int], executor: Executor) -> Task | None:
        backend, reason = choose_backend(layer, request, name, self.registry)
        label = backend.name if backend is not None else name
        if (layer_id, label) in self.done:
            self._resumed(layer, layer_id, label, reason, slot)
            return None
        if backend is None:
            self.store.add_layer_result(self.run_id, layer_id, label, None, "skipped", reason)
            self._emit(slot, layer, label, "skipped", None, reason)
            return None
        if not self.config.force:
            stored = self.store.find_spectrum(layer.content_hash, backend.name, request.params())
            if stored is not None:
                self.store.add_spectrum(self.run_id, layer_id, stored)
                self._layer_done(layer, stored, reused=True)
                self._emit(slot, layer, label, "reused", stored, "already stored")
                return None
        task = Task(layer, layer_id, backend, request, reason, self.run_id)
        refusal = executor.refuse(task)
        if refusal is not None:
            self.store.add_layer_result(self.run_id, layer_id, label, backend.kind, "failed",
                                        refusal)
            self._emit(slot, layer, label, "failed", None, refusal)
            return None
        self._slots[id(task)] = slot
        return task

    def _resumed(self, layer: Layer, layer_id: int, label: str, reason: str,
                 slot: tuple[int, int]) -> None:
        """The outcome of a (layer, backend) this resumed run already stored. Every result
        row was written in its own transaction, so one that exists is complete."""
        status, row_id = self.done[(layer_id, label)]
        if status != "ok":
            self._emit(slot, layer, label, status, None, reason)  # type: ignore[arg-type]
            return
        spectrum = self.store.load_spectrum(row_id)
        self._layer_done(layer, spectrum, reused=True)
        self._emit(slot, layer, label, "reused", spectrum, "already stored by this run")

    def record(self, task: Task, result: TaskResult) -> None:
        """Store one computed result, in one transaction."""
        slot = self._slots.pop(id(task))
        label = task.backend.name
        if result.spectrum is None:
            self.store.add_layer_result(self.run_id, task.layer_id, label, task.backend.kind,
                                        "failed", result.error)
            self._emit(slot, task.layer, label, "failed", None, result.error)
            return
        self.store.add_spectrum(self.run_id, task.layer_id, result.spectrum)
        self._layer_done(task.layer, result.spectrum, reused=False)
        self._emit(slot, task.layer, label, "ok", result.spectrum, task.reason)

    def _layer_done(self, layer: Layer, spectrum: Spectrum, reused: bool) -> None:
        self.registry.pm.hook.specprof_layer_done(run_id=self.run_id, layer=layer,
                                                  spectrum=spectrum, reused=reused)

    def _emit(self, slot: tuple[int, int], layer: Layer, backend: str, status: Status,
              spectrum: Spectrum | None, reason: str) -> None:
        if spectrum is not None and spectrum.left_vectors is not None:
            spectrum = replace(spectrum, left_vectors=None)  # big, and stored already
        outcome = LayerOutcome(LayerSummary.of(layer), backend, status, spectrum, reason)
        self.outcomes.append((slot, outcome))
        if self.on_layer is not None:
            self.on_layer(outcome)
