"""A certified Lipschitz bound (l2 -> l2, per sample) of an ``nn.Sequential``: the product of
its modules' bounds, the input shape of each found by a shape-only pass on meta tensors.
``LipschitzBound`` keeps the shapes and the layers' ``OperatorNormBound``s between calls (the
penalty of a training loop); ``lipschitz_bound`` is the one-call form."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from specprof.engine.errors import SpecprofError
from specprof.training.bounds import BOUNDED_TYPES, OperatorNormBound, certified_product

# Lipschitz constants of pointwise activations: sup |f'|.
# GELU: max of Phi(x) + x phi(x), at x = sqrt(2): 1.1289 (the tanh form: 1.1290); SiLU: 1.0998.
ACTIVATION_CONSTANTS: dict[type[nn.Module], float] = {
    nn.ReLU: 1.0, nn.ReLU6: 1.0, nn.Tanh: 1.0, nn.Hardtanh: 1.0, nn.Softplus: 1.0,
    nn.Softsign: 1.0, nn.Sigmoid: 0.25, nn.GELU: 1.13, nn.SiLU: 1.1, nn.Mish: 1.09,
    nn.Hardswish: 1.5, nn.Hardsigmoid: 1.0 / 6.0,
}
IDENTITY_TYPES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d,
                  nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
"""Isometries per sample (Dropout: the identity of the evaluated network)."""
POINTWISE_TYPES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                   nn.AlphaDropout, nn.LeakyReLU, nn.ELU, *ACTIVATION_CONSTANTS)
"""Modules whose output has their input's shape, whatever it is."""
MAX_POOL_TYPES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
AVG_POOL_TYPES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
SUPPORTED_TYPES = (*BOUNDED_TYPES, *AVG_POOL_TYPES, *MAX_POOL_TYPES, *IDENTITY_TYPES,
                   *BATCH_NORM_TYPES, nn.LeakyReLU, nn.ELU, *ACTIVATION_CONSTANTS)


def chain(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of the chain ``model`` applies, nested Sequentials flattened.
    A module used at several places is yielded at each (``named_children`` would drop the
    repeats, and with them factors of the product)."""
    if isinstance(model, nn.Sequential):
        for name, child in model.named_modules(remove_duplicate=False):
            if name and "." not in name:  # the children, in order, repeats included
                yield from chain(child, f"{prefix}.{name}" if prefix else name)
    else:
        yield prefix or type(model).__name__, model


def per_dim(value: int | tuple[int, ...], d: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, tuple | list) else (int(value),) * d


def windows_per_pixel(kernel: tuple[int, ...], stride: tuple[int, ...],
                      dilation: tuple[int, ...]) -> int:
    """The most pooling windows one input pixel can lie in: per dimension, the taps a whose
    offset dilation * a falls on one residue modulo the stride."""
    count = 1
    for k, s, dl in zip(kernel, stride, dilation, strict=True):
        period = s // math.gcd(s, dl)
        count *= -(-k // period)
    return count


def max_pool_constant(module: Any, d: int) -> float:
    """|max_W x - max_W y| <= ||(x - y)_W||_2 per window W, and each pixel is in at most c
    windows, so the pool is sqrt(c)-Lipschitz (1 for non-overlapping windows)."""
    kernel = per_dim(module.kernel_size, d)
    stride = per_dim(module.stride or module.kernel_size, d)
    dilation = per_dim(module.dilation, d)
    return math.sqrt(windows_per_pixel(kernel, stride, dilation))


def smallest_divisor(n: int, out: int, k: int, s: int, pad: int, include_pad: bool) -> int:
    """The smallest window size torch's avg_pool divides by along one axis (its formula)."""
    start = s * np.arange(out) - pad
    end = np.minimum(start + k, n + pad)
    if not include_pad:
        start, end = np.maximum(start, 0), np.minimum(end, n)
    return int(max(1, (end - start).min()))


def avg_pool_constant(module: Any, in_shape: tuple[int, ...],
                      out_shape: tuple[int, ...]) -> float:
    """The pool is linear with entries 1/divisor: Schur's test, ||A||^2 <= (max row sum)
    (max column sum), with rows summing to <= 1 (<= K/divisor_override) and columns to
    <= c / (smallest divisor), c the windows per pixel. Non-overlapping k-windows: 1/sqrt(K)."""
    d = len(in_shape) - 1
    kernel = per_dim(module.kernel_size, d)
    stride = per_dim(module.stride or module.kernel_size, d)
    pads = per_dim(module.padding, d)
    c = windows_per_pixel(kernel, stride, (1,) * d)
    override = getattr(module, "divisor_override", None)
    if override:
        return math.sqrt(math.prod(kernel) / override * c / override)
    divisor = math.prod(
        smallest_divisor(n, o, k, s, p, bool(module.count_include_pad))
        for n, o, k, s, p in zip(in_shape[1:], out_shape[1:], kernel, stride, pads, strict=True))
    return math.sqrt(c / divisor)


def batch_norm_constant(module: Any, name: str) -> torch.Tensor:
    """The evaluated BatchNorm is x -> gamma (x - mean) / sqrt(var + eps) + beta: its constant
    is max |gamma / sqrt(var + eps)| (differentiable in gamma)."""
    if module.running_var is None:
        raise SpecprofError(f"{name}: BatchNorm without running statistics has no fixed "
                            "Lipschitz constant", "use track_running_stats=True")
    scale = torch.rsqrt(module.running_var + module.eps)
    if module.weight is not None:
        scale = module.weight * scale
    return scale.abs().amax()


def floating_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating-point parameter or buffer (the input's)."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def shape_after(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The per-sample output shape of ``module`` on a per-sample input ``shape``, from a pass on
    meta tensors (no arithmetic, no memory); pointwise modules and a Linear whose input fits
    are read off directly (their meta passes cost ~0.2 ms each)."""
    if isinstance(module, POINTWISE_TYPES):
        return shape
    if isinstance(module, nn.Linear) and shape and shape[-1] == module.in_features:
        return (*shape[:-1], module.out_features)
    state = {key: torch.empty_like(value, device="meta")
             for key, value in (*module.named_parameters(), *module.named_buffers())}
    x = torch.empty((1, *shape), device="meta", dtype=floating_dtype(module))
    with torch.no_grad():  # modules without tensors run as they are (much faster)
        y = torch.func.functional_call(module, state, (x,)) if state else module(x)
    return tuple(int(n) for n in y.shape[1:])


def module_constant(name: str, module: nn.Module, shape: tuple[int, ...],
                    out_shape: tuple[int, ...]) -> torch.Tensor | float:
    """The certified Lipschitz constant of one module of a chain (not a Conv/Linear: those are
    ``OperatorNormBound``'s), or a ``SpecprofError`` naming it."""
    if isinstance(module, IDENTITY_TYPES):
        return 1.0
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(float(module.negative_slope)))
    if isinstance(module, nn.ELU):
        return max(1.0, float(module.alpha))
    if type(module) in ACTIVATION_CONSTANTS:
        return ACTIVATION_CONSTANTS[type(module)]
    if isinstance(module, MAX_POOL_TYPES):
        return max_pool_constant(module, len(shape) - 1)
    if isinstance(module, AVG_POOL_TYPES):
        return avg_pool_constant(module, shape, out_shape)
    if isinstance(module, BATCH_NORM_TYPES):
        return batch_norm_constant(module, name)
    raise SpecprofError(
        f"lipschitz_bound does not support {type(module).__name__} (module '{name}')",
        "supported: nn.Sequential chains of Conv*/ConvTranspose*/Linear, pointwise activations "
        "(ReLU, LeakyReLU, Tanh, Sigmoid, GELU, SiLU, ELU, ...), BatchNorm (eval statistics), "
        "Max/AvgPool, Flatten, Dropout; bound other models layer by layer with "
        "operator_norm_bound")


def chain_shapes(model: nn.Module, input_shape: tuple[int, ...]
                 ) -> list[tuple[str, nn.Module, tuple[int, ...], tuple[int, ...]]]:
    """(name, module, input shape, output shape) along the chain, per sample."""
    shape = input_shape
    found = []
    for name, module in chain(model):
        if not isinstance(module, SUPPORTED_TYPES):
            module_constant(name, module, shape, shape)  # raises, naming the module
        try:
            out_shape = shape_after(module, shape)
        except (RuntimeError, ValueError, TypeError, AttributeError) as error:
            raise SpecprofError(f"module '{name}' ({type(module).__name__}) does not accept a "
                                f"per-sample input of shape {shape}: {error}",
                                "pass input_shape without the batch axis, e.g. (1, 8, 8)"
                                ) from error
        found.append((name, module, shape, out_shape))
        shape = out_shape
    return found


CACHE_ATTRIBUTE = "_specprof_lipschitz_bounds"
"""Where ``lipschitz_bound`` keeps its ``LipschitzBound`` objects on the model."""


class LipschitzBound:
    """``lipschitz_bound(model, input_shape)`` as an object to call every training step: it
    keeps what does not change between steps (the chain's shapes from the meta pass, each
    Conv/Linear's ``OperatorNormBound`` with its plan, phases and last maximizing symbol, the
    constants of activations and pools), and redoes them if the chain's modules change (by
    identity). Holds only references to the model's modules; calling it reads their current
    weights (and BatchNorm statistics)."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        self.model = model
        self.input_shape = tuple(int(n) for n in input_shape)
        self.signature: tuple[tuple[str, int], ...] = ()
        self.links: list[tuple[str, nn.Module, tuple[int, ...], tuple[int, ...]]] = []
        self.bounds: dict[str, OperatorNormBound] = {}
        self.constants: dict[str, float] = {}
        """The factors that depend on the modules' settings only (activations, pools)."""
        self.refresh()

    def refresh(self) -> None:
        """Redo the shapes, bounds and constants if the chain's modules are not the ones seen
        last."""
        signature = tuple((name, id(module)) for name, module in chain(self.model))
        if signature == self.signature:
            return
        self.links = chain_shapes(self.model, self.input_shape)
        self.bounds = {name: OperatorNormBound(module, shape)
                       for name, module, shape, _ in self.links
                       if isinstance(module, BOUNDED_TYPES)}
        self.constants = {}
        for name, module, shape, out_shape in self.links:
            if name not in self.bounds and not isinstance(module, BATCH_NORM_TYPES):
                self.constants[name] = float(module_constant(name, module, shape, out_shape))
        self.signature = signature

    def factors(self) -> list[tuple[str, torch.Tensor | float]]:
        """(name, certified Lipschitz constant) of each module of the chain, in order."""
        self.refresh()
        return [(name, self.bounds[name]() if name in self.bounds
                 else self.constants[name] if name in self.constants
                 else module_constant(name, module, shape, out_shape))
                for name, module, shape, out_shape in self.links]

    def __call__(self) -> torch.Tensor:
        """The product of the factors: a 0-d tensor on the first parameter's device (float64
        if that parameter is, else float32), differentiable with respect to the weights.

        The layers' bounds are multiplied as floats and enter the graph as one node
        (``certified_product``); BatchNorm's constants (tensors) multiply it after, within
        the slack for rounding."""
        self.refresh()
        first = next(self.model.parameters(), None)
        device = torch.device("cpu") if first is None else first.device
        dtype = torch.float64 if first is not None and first.dtype == torch.float64 \
            else torch.float32
        values = [math.prod(self.constants.values())]
        gradients: list[torch.Tensor | None] = [None]
        weights = [torch.empty(0)]
        for bound in self.bounds.values():
            value, gradient = bound.evaluate(bound.wants_gradient())
            values.append(value)
            gradients.append(gradient)
            weights.append(bound.weight)
        tensors = [module_constant(name, module, shape, out_shape)
                   for name, module, shape, out_shape in self.links
                   if name not in self.bounds and name not in self.constants]
        total = certified_product(values, gradients, weights, dtype, device,
                                  roundings=len(tensors) + len(self.constants))
        for factor in tensors:
            total = total * factor
        return total


def lipschitz_factors(model: nn.Module, input_shape: tuple[int, ...]
                      ) -> list[tuple[str, torch.Tensor | float]]:
    """(name, certified Lipschitz constant) of each module of the chain, in order."""
    return LipschitzBound(model, input_shape).factors()


def lipschitz_bound(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    """A certified upper bound of the l2 Lipschitz constant of ``model`` (an ``nn.Sequential``,
    nested ones flattened) on one input of ``input_shape`` (no batch axis), differentiable
    with respect to the weights: the product of the modules' constants.

    Linear modules contribute ``operator_norm_bound``; pointwise activations sup |f'| (ReLU,
    LeakyReLU(slope <= 1), Tanh: 1; Sigmoid 1/4; GELU 1.13; SiLU 1.1); Flatten, Dropout (the
    evaluated network) 1; MaxPool sqrt(windows per pixel), 1 without overlap; AvgPool its
    Schur bound (1/sqrt(K) for non-overlapping K-windows); BatchNorm max |gamma / sqrt(var +
    eps)| with the running statistics (the evaluated network). Anything else raises a
    ``SpecprofError`` naming the module.

    The first call for an input shape builds a ``LipschitzBound`` (the meta pass and the
    layers' plans, ~2 ms on the digits CNN) and keeps it on the model itself, in the attribute
    ``CACHE_ATTRIBUTE`` (one per input shape; it holds references to the model's own modules
    only), so that calling this every training step costs what calling that object does;
    replaced modules are noticed by identity. ``LipschitzBound`` is the same without it.
    """
    shape = tuple(int(n) for n in input_shape)
    kept: dict[tuple[int, ...], LipschitzBound] | None = model.__dict__.get(CACHE_ATTRIBUTE)
    if kept is None:
        kept = {}
        object.__setattr__(model, CACHE_ATTRIBUTE, kept)  # plain attribute, not a submodule
    bound = kept.get(shape)
    if bound is None:
        bound = kept[shape] = LipschitzBound(model, shape)
    return bound()
