"""Certified, differentiable operator-norm bounds of torch layers, and Sedghi-style clipping.

A zero-padded convolution A on an n-grid is a restriction of rows and columns of the strided
*circular* convolution C on any embedding grid m >= n + (left reach) + (right reach), m a
multiple of the stride (the proof is in the ``toeplitz`` backend's ``certified_upper_bound``:
every output row of A that reads a real input equals a row of C restricted to the embedded
columns, the other rows are zero). Hence ||A|| <= ||C||, and ||C|| is exactly the largest
singular value of the polyphase symbol P(f) over the DFT grid of m / s (Sedghi et al. 2019,
Senderovich et al. 2022). This module evaluates those symbols in torch, from the module's own
weight, with the engine's phase matrices (``specprof.engine.circulant.phase_matrix``): one
complex matrix product for all frequencies and groups; then the largest singular value over
the batch without autograd (``certified_top``: one Gram decomposed, Cholesky certificates
that every other Gram lies below it), and its gradient in closed form from the top singular
vectors of the symbol that attains it. Everything stays on the weight's device.

The geometry (sizes, pads, strides, the ConvTranspose's adjoint conv) is the engine's
``ConvGeometry``, built from a specprof ``Layer`` read off the module (``module_layer``).
What does not change between training steps (the plan, the phase tensors, the symbol that
attained the maximum last time) is kept on an ``OperatorNormBound`` object, not globally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from specprof.engine.circulant import phase_matrix
from specprof.engine.errors import InputShapeError, SpecprofError
from specprof.engine.operator import ConvGeometry, conv_geometry
from specprof.engine.operator import embedding_grid as operator_embedding_grid
from specprof.engine.types import Layer

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LINEAR_TYPES = (nn.Linear,)
BOUNDED_TYPES = (*CONV_TYPES, *CONV_TRANSPOSE_TYPES, *LINEAR_TYPES)

CLIP_ITERATIONS = 5
"""Clip/project rounds ``clip_operator_norm_`` tries before it scales the weight."""
POWER_STEPS = 3
"""Batched power steps ``certified_top`` takes to guess which symbol attains the maximum."""


# --------------------------------------------------------------------------- reading modules


def torch_pads(module: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]
               ) -> tuple[int, ...]:
    """The module's zero padding in ONNX order (begin_1..begin_d, end_1..end_d)."""
    padding = module.padding
    d = len(kernel)
    if padding == "valid":
        return (0,) * (2 * d)
    if padding == "same":  # torch puts the odd pixel at the end
        total = [dl * (k - 1) for dl, k in zip(dilation, kernel, strict=True)]
        return (*(t // 2 for t in total), *(t - t // 2 for t in total))
    pads = tuple(int(p) for p in padding)
    return (*pads, *pads)


def conv_params(module: Any, input_shape: tuple[int, ...], name: str = ""
                ) -> dict[str, Any]:
    """The ``Layer`` fields of a torch Conv or ConvTranspose other than weight and bias."""
    if not isinstance(module, (*CONV_TYPES, *CONV_TRANSPOSE_TYPES)):
        raise SpecprofError(f"{type(module).__name__} is not a Conv, ConvTranspose or Linear",
                            "bound the other modules with lipschitz_bound")
    if module.padding_mode != "zeros":
        raise SpecprofError(
            f"{name or type(module).__name__}: padding_mode={module.padding_mode!r} is not "
            "supported", "the certified bounds cover zero padding (padding_mode='zeros')")
    kernel = tuple(int(k) for k in module.kernel_size)
    dilation = tuple(int(x) for x in module.dilation)
    transposed = isinstance(module, CONV_TRANSPOSE_TYPES)
    shape = tuple(int(n) for n in input_shape)
    if len(shape) != len(kernel) + 1:
        raise InputShapeError(
            f"{name or type(module).__name__}: input shape {shape} does not fit a "
            f"{len(kernel)}d convolution", "pass (C, n_1, ..., n_d) without the batch axis")
    return {"op_type": "ConvTranspose" if transposed else "Conv",
            "strides": tuple(int(s) for s in module.stride),
            "pads": torch_pads(module, kernel, dilation), "dilations": dilation,
            "groups": int(module.groups),
            "output_padding": tuple(int(p) for p in module.output_padding) if transposed else (),
            "input_shape": shape}


def module_layer(module: Any, input_shape: tuple[int, ...], name: str = "",
                 index: int = 0) -> Layer:
    """A specprof ``Layer`` (float64 copies of weight and bias) for a torch Conv,
    ConvTranspose or Linear on one input of ``input_shape``: (C, n_1, ..., n_d) for
    convolutions, (..., in_features) for Linear."""
    weight = module.weight.detach().to("cpu", torch.float64).numpy()
    bias = getattr(module, "bias", None)
    bias_array = None if bias is None else bias.detach().to("cpu", torch.float64).numpy()
    if isinstance(module, LINEAR_TYPES):
        return Layer(name=name, op_type="Gemm", weight=weight, bias=bias_array,
                     input_shape=(module.in_features,), output_shape=(module.out_features,),
                     index=index, node_name=name)
    return Layer(name=name, weight=weight, bias=bias_array, index=index, node_name=name,
                 **conv_params(module, input_shape, name))


@dataclass(frozen=True)
class ConvPlan:
    """What the symbol of one conv needs, besides the weight: the embedding grid (full sizes,
    multiples of the strides), the conv side's strides and dilations and the group sizes."""

    kernel: tuple[int, ...]
    grid: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    groups: int
    c_out: int
    c_in: int
    """Per group, of the conv side (a ConvTranspose's own c_in is the conv side's c_out)."""

    @property
    def small_grid(self) -> tuple[int, ...]:
        return tuple(m // s for m, s in zip(self.grid, self.strides, strict=True))

    @property
    def n_phase(self) -> int:
        return math.prod(self.strides)

    @property
    def taps(self) -> int:
        return math.prod(self.kernel)


def embedding_grid(geom: ConvGeometry) -> tuple[int, ...]:
    """The engine's embedding grid (``specprof.engine.operator.embedding_grid``) in samples:
    the zero-padded conv is a restriction of the strided circular conv on this grid."""
    return tuple(m * s for m, s in zip(operator_embedding_grid(geom), geom.strides, strict=True))


def plan_of(module: Any, input_shape: tuple[int, ...]) -> ConvPlan:
    """The plan of a torch Conv or ConvTranspose on one input of ``input_shape``."""
    params = conv_params(module, input_shape)
    layer = Layer(name="", weight=np.zeros(tuple(module.weight.shape), dtype=np.float32),
                  **params)
    geom = conv_geometry(layer)
    return ConvPlan(kernel=geom.kernel, grid=embedding_grid(geom), strides=geom.strides,
                    dilations=geom.dilations, groups=geom.groups,
                    c_out=geom.c_out // geom.groups, c_in=geom.c_in // geom.groups)


def conjugate_representatives(small_grid: tuple[int, ...]) -> np.ndarray:
    """Flat indices into the rfft half grid of ``small_grid`` ((N_1, ..., N_d // 2 + 1), C
    order) keeping one frequency of each conjugate pair {f, -f mod N}: a real kernel's symbols
    there have the same singular values (P(-f) = conj P(f)). The half grid holds both members
    of a pair only where f_d = 0 or f_d = N_d / 2; of those the first is kept."""
    half = (*small_grid[:-1], small_grid[-1] // 2 + 1)
    own = np.indices(half).reshape(len(half), -1)
    conjugate = -own % np.array(small_grid)[:, None]
    on_half = conjugate[-1] < half[-1]
    conjugate_flat = np.ravel_multi_index(tuple(np.where(on_half, conjugate, 0)), half)
    return np.nonzero(~on_half | (conjugate_flat >= np.arange(own.shape[1])))[0]


def phase_rows(plan: ConvPlan, half: bool) -> np.ndarray:
    """The phase tensor of ``plan`` as a matrix: rows (frequency, polyphase component), columns
    the kernel taps; the engine's ``symbol_matrices`` layout. ``half``: one frequency of each
    conjugate pair of the rfft half grid (``conjugate_representatives``: enough for the norm of
    a real kernel) rather than the full grid (for clipping)."""
    d = len(plan.grid)
    phases: np.ndarray = np.ones((), dtype=np.complex128)
    for j in range(d):  # outer product: axes (k_1, s_1, F_1, k_2, s_2, F_2, ...)
        phases = np.multiply.outer(phases, phase_matrix(
            plan.kernel[j], plan.grid[j], plan.strides[j], plan.dilations[j],
            half=half and j == d - 1))
    n_freq = math.prod(phases.shape[2::3])
    rows = [*range(2, 3 * d, 3), *range(1, 3 * d, 3), *range(0, 3 * d, 3)]  # (F..., s..., k...)
    matrix = np.ascontiguousarray(phases.transpose(rows)).reshape(n_freq, plan.n_phase, -1)
    if half:
        matrix = matrix[conjugate_representatives(plan.small_grid)]
    return matrix.reshape(-1, matrix.shape[-1])


def complex_dtype(dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(real, complex) working dtypes for a weight dtype: float64 stays, the rest is float32."""
    if dtype == torch.float64:
        return torch.float64, torch.complex128
    return torch.float32, torch.complex64


def symbols(weight: torch.Tensor, plan: ConvPlan, phases: torch.Tensor) -> torch.Tensor:
    """The polyphase symbols on the grid of ``phases`` (``phase_rows`` of the plan, half or full
    grid, as a tensor of the working complex dtype): (groups, F, c_out, S * c_in), F the
    frequencies, S the polyphase components; Q[o, (s, i)] = sum_t phase[f, s, t] W[g, o, i, t].
    Differentiable. (Without strides or groups, no copy but the product's.)"""
    real, cplx = complex_dtype(weight.dtype)
    g, co, ci = plan.groups, plan.c_out, plan.c_in
    w = weight.to(real).reshape(g * co * ci, plan.taps)
    x = phases @ w.to(cplx).T  # (F * S, g * co * ci)
    n_freq = phases.shape[0] // plan.n_phase
    x = x.reshape(n_freq, plan.n_phase, g, co, ci).permute(2, 0, 3, 1, 4)
    return x.reshape(g, n_freq, co, plan.n_phase * ci)


def rounding_margin(weight: torch.Tensor, taps: int, rows: int, cols: int) -> float:
    """An absolute bound on the floating-point error of the computed norm.

    Each symbol entry sums ``taps`` products (error <= ~2 taps eps sum|w|) and the SVD is
    backward stable (error <= ~(rows + cols) eps ||P||); both are below
    eps sqrt(taps) ||W||_F times the factor used here, since ||P(f)|| <= sqrt(taps) ||W||_F."""
    real = complex_dtype(weight.dtype)[0]
    eps = torch.finfo(real).eps
    return 4.0 * eps * (2 * taps + rows + cols) * math.sqrt(taps) * float(
        torch.linalg.vector_norm(weight.to(real)))


# --------------------------------------------------------------------------- the bound


def gram_of(stack: torch.Tensor) -> torch.Tensor:
    """The Gram of each matrix on its smaller side (the same nonzero eigenvalues)."""
    rows, cols = stack.shape[-2:]
    return stack @ stack.mH if rows <= cols else stack.mH @ stack


def likely_top(grams: torch.Tensor) -> int:
    """The index of the Gram that most likely has the largest top eigenvalue: the largest
    Rayleigh quotient after a few batched power steps (a guess; ``certified_top`` checks it)."""
    tiny = torch.finfo(grams.real.dtype).tiny
    vector = torch.ones((*grams.shape[:-1], 1), dtype=grams.dtype, device=grams.device)
    for _ in range(POWER_STEPS):
        vector = grams @ vector
        # (a batched complex vector_norm is ~50x slower than this product)
        vector = vector / (vector.mH @ vector).real.sqrt().clamp(min=tiny)
    return int(torch.argmax((vector.mH @ grams @ vector).real.reshape(-1)))


def certified_top(stack: torch.Tensor, start: int | None = None
                  ) -> tuple[float, int, torch.Tensor]:
    """(b, i, x): b an upper bound of the largest singular value over all matrices of
    ``stack`` (flat over its batch axes), i the index of a matrix attaining it within that
    bound, x the top eigenvector of that matrix's Gram (``gram_of``); no gradient.

    Decomposing every Gram costs most of a penalized step (a batched ``eigvalsh`` is ~7x a
    batched Cholesky), so (like the engine's ``TopKSearch``) only the likely maximum is
    decomposed: ``start`` (the index that attained it last time) or else a few power steps
    pick it, its Gram's top eigenvalue lambda* is computed, and every Gram G is proven below
    the level b^2 = lambda* (1 + delta) by a Cholesky factorization of b^2 I - G (positive
    definite iff lambda_max(G) < b^2). The few Grams not proven are decomposed, and the level
    raised to the largest of them. A successful floating-point Cholesky proves b^2 I - G + E
    positive definite with ||E|| <= (r+1) r eps b^2 (Demmel 1989), forming G and b^2 I - G
    adds ~(r + cols + 1) eps b^2, and ``eigh``'s error is below that: the bound returned is
    b (1 + delta)^(1/2), which covers all three."""
    grams = gram_of(stack.reshape(-1, *stack.shape[-2:]))
    r = grams.shape[-1]
    real = grams.real.dtype
    eps, tiny = torch.finfo(real).eps, torch.finfo(real).tiny
    delta = 2.0 * ((r + 1) * r + r + max(stack.shape[-2:]) + 2) * eps
    if r == 1:  # 1 x 1 Grams: their entries are the eigenvalues
        tops = grams[:, 0, 0].real
        best = int(torch.argmax(tops))
        level = max(float(tops[best]), tiny) * (1.0 + delta)
        return math.sqrt(level * (1.0 + delta)), best, torch.ones(
            1, dtype=grams.dtype, device=grams.device)
    best = start if start is not None and 0 <= start < grams.shape[0] else likely_top(grams)
    values, vectors = torch.linalg.eigh(grams[best])
    level = max(float(values[-1]), tiny) * (1.0 + delta)
    vector = vectors[:, -1]
    eye = torch.eye(r, dtype=grams.dtype, device=grams.device)
    _, info = torch.linalg.cholesky_ex(torch.sub(eye, grams, alpha=1.0 / level))  # (b I - G)/b
    unproven = torch.nonzero(info).reshape(-1)
    if unproven.numel():
        values, vectors = torch.linalg.eigh(grams[unproven])
        worst = int(torch.argmax(values[:, -1]))
        if float(values[worst, -1]) * (1.0 + delta) > level:
            level = float(values[worst, -1]) * (1.0 + delta)
            best, vector = int(unproven[worst]), vectors[worst, :, -1]
    return math.sqrt(level * (1.0 + delta)), best, vector


def top_vectors(matrix: torch.Tensor, vector: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v), unit top singular vectors of ``matrix`` from ``vector``, the top eigenvector of
    its ``gram_of``: sigma_max = Re(u^H M v), and d sigma_max = Re(u^H dM v) where it is
    simple. (A zero matrix gives v = 0: a zero gradient.)"""
    rows, cols = matrix.shape
    other = matrix.mH @ vector if rows <= cols else matrix @ vector
    other = other / torch.linalg.vector_norm(other).clamp(min=torch.finfo(other.real.dtype).tiny)
    return (vector, other) if rows <= cols else (other, vector)


class KnownGradient(torch.autograd.Function):
    """A value computed without autograd, as a function of some weights whose derivatives
    are known: one node in the graph rather than the ops that computed the value."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor,  # type: ignore[override]
                gradients: list[torch.Tensor], *weights: torch.Tensor) -> torch.Tensor:
        ctx.gradients = gradients  # not inputs or outputs: kept on ctx, not saved
        ctx.dtypes = [weight.dtype for weight in weights]
        return value

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, ...]:
        grads = [grad_output * gradient for gradient in ctx.gradients]
        return (None, None, *(grad if grad.dtype == dtype else grad.to(dtype)
                              for grad, dtype in zip(grads, ctx.dtypes, strict=True)))


def certified_product(values: list[float], gradients: list[torch.Tensor | None],
                      weights: list[torch.Tensor], dtype: torch.dtype, device: torch.device,
                      roundings: int = 0) -> torch.Tensor:
    """prod(values) (certified bounds, as floats) as a 0-d ``dtype`` tensor, rounded up, whose
    derivative in ``weights[i]`` is prod(values[j], j != i) * gradients[i] (None: no gradient).
    ``roundings``: how many more products the caller will round (covered by the slack)."""
    product = math.prod(values)
    # float64 products round by <= 1/2 ulp each, the conversion to dtype by <= 1 ulp of dtype.
    product *= 1.0 + 2.0 * (len(values) + roundings + 2) * torch.finfo(dtype).eps
    value = torch.tensor(product, dtype=dtype, device=device)
    used = [(i, gradient, weight) for i, (gradient, weight)
            in enumerate(zip(gradients, weights, strict=True)) if gradient is not None]
    if not used:
        return value
    scaled = [gradient * math.prod(values[:i] + values[i + 1:]) for i, gradient, _ in used]
    return KnownGradient.apply(value, scaled, *(weight for _, _, weight in used))


class OperatorNormBound:
    """The certified, differentiable bound of one module (``operator_norm_bound``) on one input
    of ``input_shape``, with what does not change between calls kept: the plan and phase
    tensors of a convolution, and which symbol attained the maximum last time (tried first).
    Calling it reads the module's current weight; build it once, call it every step."""

    def __init__(self, module: nn.Module, input_shape: tuple[int, ...]) -> None:
        if not isinstance(module, BOUNDED_TYPES):
            raise SpecprofError(f"{type(module).__name__} is not a Conv, ConvTranspose or Linear",
                                "bound the other modules with lipschitz_bound")
        self.module = module
        self.input_shape = tuple(int(n) for n in input_shape)
        self.plan = None if isinstance(module, LINEAR_TYPES) else plan_of(module,
                                                                          self.input_shape)
        self.phases: dict[tuple[bool, torch.device, torch.dtype], torch.Tensor] = {}
        self.last_top: int | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight  # type: ignore[return-value]

    def phase_tensor(self, half: bool, device: torch.device, dtype: torch.dtype
                     ) -> torch.Tensor:
        """``phase_rows`` of the plan on ``device`` in ``dtype``, made once."""
        key = (half, device, dtype)
        if key not in self.phases:
            assert self.plan is not None
            self.phases[key] = torch.from_numpy(phase_rows(self.plan, half)).to(
                device=device, dtype=dtype)
        return self.phases[key]

    def wants_gradient(self) -> bool:
        return self.weight.requires_grad and torch.is_grad_enabled()

    def __call__(self) -> torch.Tensor:
        weight = self.weight
        value, gradient = self.evaluate(self.wants_gradient())
        return certified_product([value], [gradient], [weight],
                                 complex_dtype(weight.dtype)[0], weight.device)

    def evaluate(self, with_grad: bool) -> tuple[float, torch.Tensor | None]:
        """(the certified bound as a float, the gradient of the norm it bounds in the weight,
        in the working real dtype; None if not ``with_grad``)."""
        with torch.no_grad():
            weight = self.weight.detach()
            if self.plan is None:
                return self.linear_bound(weight, with_grad)
            return self.conv_bound(weight, self.plan, with_grad)

    def linear_bound(self, w: torch.Tensor, with_grad: bool
                     ) -> tuple[float, torch.Tensor | None]:
        """A Linear's weight: the spectral norm from the top eigenpair of the smaller Gram,
        widened by eigh's error, plus the rounding margin."""
        w = w.to(complex_dtype(w.dtype)[0])
        values, vectors = torch.linalg.eigh(gram_of(w))
        rows, cols = w.shape
        eps = torch.finfo(w.dtype).eps  # eigh's error: ~(rows + cols) eps sigma^2 (relative)
        sigma = math.sqrt(max(float(values[-1]), 0.0)) * (1.0 + 2.0 * (rows + cols + 2) * eps)
        value = sigma + rounding_margin(w, 1, rows, cols)
        if not with_grad:
            return value, None
        u, v = top_vectors(w, vectors[:, -1])
        return value, torch.outer(u, v)

    def conv_bound(self, w: torch.Tensor, plan: ConvPlan, with_grad: bool
                   ) -> tuple[float, torch.Tensor | None]:
        """A conv's weight: the largest singular value over the half-grid symbols
        (``certified_top``) plus the rounding margin; the gradient is that of Re(u^H P(f) v)
        at the symbol attaining it, in closed form."""
        real, cplx = complex_dtype(w.dtype)
        phases = self.phase_tensor(True, w.device, cplx)
        stack = symbols(w, plan, phases)
        top, flat, vector = certified_top(stack, self.last_top)
        self.last_top = flat
        value = top + rounding_margin(w, plan.taps, *stack.shape[-2:])
        if not with_grad:
            return value, None
        group, freq = divmod(flat, stack.shape[1])
        u, v = top_vectors(stack[group, freq], vector)
        # Q[o, (s, i)] = sum_t phase[f, s, t] W[g, o, i, t], so
        # d Re(u^H Q v) / d W[g, o, i, t] = Re(conj(u[o]) sum_s v[s, i] phase[f, s, t]).
        at_freq = phases[freq * plan.n_phase:(freq + 1) * plan.n_phase]  # (S, taps)
        per_input = v.reshape(plan.n_phase, plan.c_in).T @ at_freq  # (c_in, taps)
        in_group = (u.conj()[:, None, None] * per_input).real  # (c_out, c_in, taps)
        if plan.groups == 1:
            return value, in_group.reshape(w.shape)
        gradient = torch.zeros((plan.groups, *in_group.shape), dtype=real, device=w.device)
        gradient[group] = in_group
        return value, gradient.reshape(w.shape)


def operator_norm_bound(module: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    """A certified upper bound of the operator norm of ``module`` on one input of
    ``input_shape`` (no batch axis: (C, n_1, ..., n_d) for a conv, (in_features,) or any
    (..., in_features) for Linear), differentiable with respect to the weight.

    Supported: ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` with zero padding (ints,
    tuples, 'same' or 'valid'), any stride, dilation and groups; ``nn.Linear`` (the spectral
    norm of its weight). A 0-d tensor on the weight's device, float64 for float64 weights,
    else float32. In a training loop, build ``OperatorNormBound(module, input_shape)`` once
    and call it: this function builds one per call.

    Value: the largest singular value over the DFT grid of the polyphase symbols of the strided
    circular convolution on the embedding grid m >= n + reach (half grid: real kernels have
    P(-f) = conj P(f); batched over frequencies and groups), plus a rounding margin, so it is
    >= the true zero-padded norm in exact arithmetic and after rounding. A ConvTranspose has the
    norm of the conv it is the adjoint of. Gradient: that of the largest singular value of the
    symbol attaining the maximum, Re(u^H dP v) (exact where that value is simple, a
    subgradient of the maximum otherwise), in closed form: no symbol is built with autograd.

    How tight (``tests/test_training.py``, 60 random layers with 1-3 spatial dimensions,
    strides 1-2, dilations 1-2, groups, padding from none to past 'same', ConvTranspose,
    inputs of 3-12 pixels, against the dense zero-padded operator): bound / true >= 1 every
    time, median 1.08, at most 3.4 (a 3-d, dilated kernel on a 4^3 input); the gap shrinks as
    the input grows (the zero-padded norm tends to the symbol's supremum, which the circulant
    samples). On the digits CNN's convolutions (8x8 and 4x4 inputs, 'same' 3x3): 1.03-1.13.
    """
    return OperatorNormBound(module, input_shape)()


# --------------------------------------------------------------------------- clipping


def project_symbols(clipped: torch.Tensor, plan: ConvPlan, phases: torch.Tensor,
                    weight_shape: torch.Size) -> torch.Tensor:
    """The kernel (of the plan's support) whose full-grid symbols are nearest to ``clipped``
    (groups, F, c_out, S * c_in) in Frobenius norm: the phase columns of distinct taps are
    orthogonal on the full grid, each of squared norm F (no two taps alias on an embedding
    grid), so this is the inverse DFT at the taps, real part. ``phases``: the full grid's."""
    g, co, ci = plan.groups, plan.c_out, plan.c_in
    n_freq = clipped.shape[1]
    x = clipped.reshape(g, n_freq, co, plan.n_phase, ci).permute(1, 3, 0, 2, 4)
    x = x.reshape(n_freq * plan.n_phase, g * co * ci)
    taps_by_channel = (phases.mH @ x).real / n_freq  # (taps, g * co * ci)
    return taps_by_channel.T.reshape(weight_shape)


def clip_symbols(stack: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Each matrix of ``stack`` with its singular values clipped to ``max_norm``."""
    u, s, vh = torch.linalg.svd(stack, full_matrices=False)
    return (u * s.clamp(max=max_norm).to(u.dtype).unsqueeze(-2)) @ vh


@torch.no_grad()
def clip_operator_norm_(module: nn.Module, max_norm: float, input_shape: tuple[int, ...],
                        iterations: int = CLIP_ITERATIONS) -> float:
    """Change ``module.weight`` in place so that its certified bound
    (``operator_norm_bound``), hence its true zero-padded operator norm on ``input_shape``,
    is <= ``max_norm``; returns the final certified bound.

    Conv/ConvTranspose (Sedghi et al. 2019 on the embedding grid): clip the singular values of
    every frequency's symbol to ``max_norm``, project back to the kernel's support (the
    least-squares kernel: inverse DFT, cropped), repeat while the bound is above ``max_norm``,
    at most ``iterations`` times; if still above, scale the weight by max_norm / bound, which
    certifies. Linear: its SVD clipped (exact in one step). A weight already within the bound
    is left as it is.
    """
    if max_norm <= 0:
        raise SpecprofError(f"max_norm must be positive, not {max_norm}",
                            "pass the largest operator norm the layer may have")
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    bound_of = OperatorNormBound(module, input_shape)
    bound = float(bound_of())
    if bound <= max_norm:
        return bound
    if bound_of.plan is None:
        real = complex_dtype(weight.dtype)[0]
        weight.copy_(clip_symbols(weight.to(real), max_norm).to(weight.dtype))
    else:
        phases = bound_of.phase_tensor(False, weight.device, complex_dtype(weight.dtype)[1])
        for _ in range(iterations):
            clipped = clip_symbols(symbols(weight, bound_of.plan, phases), max_norm)
            weight.copy_(project_symbols(clipped, bound_of.plan, phases, weight.shape
                                         ).to(weight.dtype))
            bound = float(bound_of())
            if bound <= max_norm:
                return bound
    return scale_to_bound_(bound_of, max_norm)


def scale_to_bound_(bound_of: OperatorNormBound, max_norm: float) -> float:
    """Scale the weight until its certified bound is <= ``max_norm`` (one step, a second
    only if rounding left it a hair above); returns the bound."""
    weight = bound_of.module.weight
    bound = float(bound_of())
    for attempt in range(4):
        if bound <= max_norm:
            return bound
        weight.mul_(max_norm / bound * (1.0 - 1e-6 * 10**attempt))
        bound = float(bound_of())
    if bound > max_norm:
        raise SpecprofError(f"could not bring the bound {bound:.6g} below {max_norm}",
                            "the weight may contain NaN or Inf")
    return bound
