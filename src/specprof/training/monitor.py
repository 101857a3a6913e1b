"""``SpectralMonitor``: profile a model's current weights into the store while it trains.

The layers are read straight from the torch modules (no ONNX export): each Conv,
ConvTranspose and Linear becomes a specprof ``Layer`` with its input shape from one pass on
meta tensors (done once). Every ``every`` steps the monitor runs the normal profile path
(``specprof.engine.profile.profile_model``) on them, so the result is an ordinary run that
``specprof runs``, ``query``, ``analyze`` and ``report`` read. The step is recorded twice: in
the run's configuration (``"step": N``, from ``TrainingProfileConfig``) and in the model name
(``NAME@step=N``), so ``specprof runs --model 'NAME@step=*'`` lists the monitor's runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn

from specprof.engine.errors import SpecprofError
from specprof.engine.plugins import get_registry
from specprof.engine.profile import ProfileConfig, ProfileResult, profile_model, split_names
from specprof.engine.store import Store
from specprof.engine.types import TARGET_OPSET, Layer, LoadedModel
from specprof.training.bounds import BOUNDED_TYPES, module_layer
from specprof.training.chain import floating_dtype


@dataclass(frozen=True)
class TrainingProfileConfig(ProfileConfig):
    """A ``ProfileConfig`` that also records the training step in the run's configuration."""

    step: int | None = None


def layer_input_shapes(model: nn.Module, input_shape: tuple[int, ...]
                       ) -> dict[str, tuple[int, ...]]:
    """Per-sample input shape of every Conv/ConvTranspose/Linear module of ``model`` (by
    qualified name), from one forward pass on meta tensors."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, BOUNDED_TYPES):
            def record(mod: nn.Module, args: tuple[Any, ...], _out: Any, name: str = name) -> None:
                shapes.setdefault(name, tuple(int(n) for n in args[0].shape[1:]))
            handles.append(module.register_forward_hook(record))
    state = {key: torch.empty_like(value, device="meta")
             for key, value in (*model.named_parameters(), *model.named_buffers())}
    try:
        with torch.no_grad():
            torch.func.functional_call(model, state, (torch.empty(
                (1, *input_shape), device="meta", dtype=floating_dtype(model)),))
    except (RuntimeError, ValueError, TypeError) as error:
        raise SpecprofError(f"{type(model).__name__} does not run on a per-sample input of "
                            f"shape {tuple(input_shape)} (meta pass: {error})",
                            "pass input_shape without the batch axis, e.g. (1, 8, 8)") from error
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def model_layers(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> tuple[Layer, ...]:
    """The model's current Conv/ConvTranspose/Linear weights as specprof Layers (modules the
    forward pass never reached are left out)."""
    layers: list[Layer] = []
    for name, module in model.named_modules():
        if isinstance(module, BOUNDED_TYPES) and name in shapes:
            layers.append(module_layer(module, shapes[name], name=name, index=len(layers)))
    return tuple(layers)


class SpectralMonitor:
    """Every ``every`` steps, ``step(n)`` profiles ``model``'s current weights into the store at
    ``db`` (a URL or path; None: the default database) as one run tagged with the step.

    ``backend``: a backend name, several joined by commas, or ``auto`` (the registry picks per
    layer). ``name``: the model's name in the store (default: the model's class name); runs
    are stored under ``NAME@step=N``. Extra keyword arguments go to the ``ProfileConfig``
    (``top_k``, ``device``, ``precision``, ...). Use as a context manager, or call ``close``.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], db: str | None = None,
                 every: int = 1, backend: str = "auto", name: str | None = None,
                 **config: Any) -> None:
        if every < 1:
            raise SpecprofError(f"every must be a positive number of steps, not {every}",
                                "pass every=1 to profile at every call")
        self.model = model
        self.input_shape = tuple(int(n) for n in input_shape)
        self.every = every
        self.name = name or type(model).__name__
        self.backends = split_names(backend) or ("auto",)
        self.config = config
        self.registry = get_registry()
        TrainingProfileConfig(backends=self.backends, **config)  # fail early on bad options
        self.shapes = layer_input_shapes(model, self.input_shape)
        if not self.shapes:
            raise SpecprofError(f"{self.name} has no Conv, ConvTranspose or Linear module to "
                                "profile", "pass the model whose layers to follow")
        self.store = Store.open(db)
        self.run_ids: list[int] = []

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def step(self, step: int) -> int | None:
        """Profile now if ``step`` is a multiple of ``every``; the new run's id, else None."""
        if not self.due(step):
            return None
        return self.profile(step).run_id

    def profile(self, step: int) -> ProfileResult:
        """Profile the current weights as a run tagged with ``step`` (whatever ``every`` says)."""
        loaded = LoadedModel(name=f"{self.name}@step={step}", format="torch", framework="torch",
                             opset=TARGET_OPSET, layers=model_layers(self.model, self.shapes),
                             source=f"specprof.training.SpectralMonitor step {step}")
        config = TrainingProfileConfig(backends=self.backends, step=step, **self.config)
        result = profile_model(loaded, config, self.store, self.registry)
        self.run_ids.append(result.run_id)
        return result

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> SpectralMonitor:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
