"""Certified, differentiable operator-norm bounds of torch layers, and Sedghi-style clipping.

A zero-padded convolution A on an n-grid is a restriction of rows and columns of the strided
*circular* convolution C on any embedding grid m >= n + (left reach) + (right reach), m a
multiple of the stride (the proof is in the ``toeplitz`` backend's ``certified_upper_bound``:
every output row of A that reads a real input equals a row of C restricted to the embedded
columns, the other rows are zero). Hence ||A|| <= ||C||, and ||C|| is exactly the largest
singular value of the polyphase symbol P(f) over the DFT grid of m / s (Sedghi et al. 2019,
Senderovich et al. 2022). This module evaluates those symbols in torch, from the module's own
weight, with the engine's phase matrices (``specprof.engine.circulant.phase_matrix``): one
complex matrix product for all frequencies and groups, then the largest singular value over
the batch without autograd (``certified_top``: the Grams' top eigenvalues, or one
decomposition and Cholesky certificates for the rest), and its gradient through the one
symbol that attains it. Everything stays on the weight's device.

The geometry (sizes, pads, strides, the ConvTranspose's adjoint conv) is the engine's
``ConvGeometry``, built from a specprof ``Layer`` read off the module (``module_layer``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
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
DECOMPOSE_ALL_BELOW = 256
"""Up to this many symbols, ``certified_top`` decomposes them all rather than certify."""


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


def embedding_grid(geom: ConvGeometry) -> tuple[int, ...]:
    """The engine's embedding grid (``specprof.engine.operator.embedding_grid``) in samples:
    the zero-padded conv is a restriction of the strided circular conv on this grid."""
    return tuple(m * s for m, s in zip(operator_embedding_grid(geom), geom.strides, strict=True))


@lru_cache(maxsize=256)
def conv_plan(op_type: str, weight_shape: tuple[int, ...], strides: tuple[int, ...],
              pads: tuple[int, ...], dilations: tuple[int, ...], groups: int,
              output_padding: tuple[int, ...], input_shape: tuple[int, ...]) -> ConvPlan:
    """The plan of a conv from its parameters (cached: the same layer asks every step)."""
    layer = Layer(name="", op_type=op_type,  # type: ignore[arg-type]
                  weight=np.zeros(weight_shape, dtype=np.float32), strides=strides, pads=pads,
                  dilations=dilations, groups=groups, output_padding=output_padding,
                  input_shape=input_shape)
    geom = conv_geometry(layer)
    return ConvPlan(kernel=geom.kernel, grid=embedding_grid(geom), strides=geom.strides,
                    dilations=geom.dilations, groups=geom.groups,
                    c_out=geom.c_out // geom.groups, c_in=geom.c_in // geom.groups)


def plan_of(module: Any, input_shape: tuple[int, ...]) -> ConvPlan:
    params = conv_params(module, input_shape)
    return conv_plan(params["op_type"], tuple(module.weight.shape), params["strides"],
                     params["pads"], params["dilations"], params["groups"],
                     params["output_padding"], params["input_shape"])


@lru_cache(maxsize=256)
def phase_rows(plan: ConvPlan, half: bool) -> np.ndarray:
    """The phase tensor of ``plan`` as a matrix: rows (frequency, polyphase component), columns
    the kernel taps; the engine's ``symbol_matrices`` layout. ``half``: the rfft half grid
    (enough for the norm of a real kernel) rather than the full grid (for clipping)."""
    d = len(plan.grid)
    phases: np.ndarray = np.ones((), dtype=np.complex128)
    for j in range(d):  # outer product: axes (k_1, s_1, F_1, k_2, s_2, F_2, ...)
        phases = np.multiply.outer(phases, phase_matrix(
            plan.kernel[j], plan.grid[j], plan.strides[j], plan.dilations[j],
            half=half and j == d - 1))
    n_freq = math.prod(phases.shape[2::3])
    rows = [*range(2, 3 * d, 3), *range(1, 3 * d, 3), *range(0, 3 * d, 3)]  # (F..., s..., k...)
    matrix = np.ascontiguousarray(phases.transpose(rows)).reshape(n_freq * plan.n_phase, -1)
    matrix.flags.writeable = False
    return matrix


@lru_cache(maxsize=256)
def phase_tensor(plan: ConvPlan, half: bool, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.array(phase_rows(plan, half))).to(device=device, dtype=dtype)


def complex_dtype(dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(real, complex) working dtypes for a weight dtype: float64 stays, the rest is float32."""
    if dtype == torch.float64:
        return torch.float64, torch.complex128
    return torch.float32, torch.complex64


def symbols(weight: torch.Tensor, plan: ConvPlan, half: bool = True) -> torch.Tensor:
    """The polyphase symbols on the plan's grid, transposed: (groups, F, S * c_in, c_out),
    F the frequencies (half or full grid), S the polyphase components. Differentiable."""
    real, cplx = complex_dtype(weight.dtype)
    phases = phase_tensor(plan, half, weight.device, cplx)
    g, co, ci = plan.groups, plan.c_out, plan.c_in
    taps = math.prod(plan.kernel)
    w = weight.to(real).reshape(g, co, ci, taps).permute(0, 2, 1, 3).reshape(g * ci * co, taps)
    x = phases @ w.to(cplx).T  # (F * S, g * ci * co)
    n_freq = phases.shape[0] // plan.n_phase
    x = x.reshape(n_freq, plan.n_phase, g, ci, co).permute(2, 0, 1, 3, 4)
    return x.reshape(g, n_freq, plan.n_phase * ci, co)


def rounding_margin(weight: torch.Tensor, taps: int, rows: int, cols: int) -> torch.Tensor:
    """An absolute bound on the floating-point error of the computed norm.

    Each symbol entry sums ``taps`` products (error <= ~2 taps eps sum|w|) and the SVD is
    backward stable (error <= ~(rows + cols) eps ||P||); both are below
    eps sqrt(taps) ||W||_F times the factor used here, since ||P(f)|| <= sqrt(taps) ||W||_F."""
    eps = torch.finfo(complex_dtype(weight.dtype)[0]).eps
    return 4.0 * eps * (2 * taps + rows + cols) * math.sqrt(taps) * torch.linalg.vector_norm(
        weight.to(complex_dtype(weight.dtype)[0]))


# --------------------------------------------------------------------------- the bound


def gram_of(stack: torch.Tensor) -> torch.Tensor:
    rows, cols = stack.shape[-2:]
    return stack @ stack.mH if rows <= cols else stack.mH @ stack


def certified_top(stack: torch.Tensor) -> tuple[float, int]:
    """(an upper bound of the largest singular value over all matrices of ``stack``, the
    index of a matrix attaining it within that bound), flat over the batch axes; no gradient.

    Deciding every frequency by ``eigvalsh`` costs most of a penalized step, so (like the
    engine's ``TopKSearch``) only the likely maximum is decomposed: a few batched power steps
    pick it, its Gram's top eigenvalue lambda* is computed, and every other Gram G is proven
    below b = lambda* (1 + delta) by a Cholesky factorization of b I - G (positive definite
    iff lambda_max(G) < b). A successful floating-point Cholesky proves b I - G + E positive
    definite with ||E|| <= (r+1) r eps b (Demmel 1989), and forming G and b I - G adds
    ~(r + cols + 1) eps b: delta covers both (and eigvalsh's own error). The few Grams not
    proven are decomposed. Batches of up to ``DECOMPOSE_ALL_BELOW`` are decomposed at once
    (fewer, larger calls are faster there)."""
    grams = gram_of(stack.reshape(-1, *stack.shape[-2:]))
    r = grams.shape[-1]
    cols = max(stack.shape[-2:])
    eps = torch.finfo(grams.real.dtype).eps
    delta = 2.0 * ((r + 1) * r + r + cols + 2) * eps
    if grams.shape[0] <= DECOMPOSE_ALL_BELOW:
        tops = torch.linalg.eigvalsh(grams)[..., -1].clamp(min=0)
        best = int(torch.argmax(tops))
        return math.sqrt(float(tops[best]) * (1.0 + delta)), best
    vector = torch.ones((*grams.shape[:-1], 1), dtype=grams.dtype, device=grams.device)
    for _ in range(3):
        vector = grams @ vector
        vector = vector / vector.norm(dim=-2, keepdim=True).clamp(min=torch.finfo(
            grams.real.dtype).tiny)
    rayleigh = (vector.mH @ grams @ vector).real.reshape(-1)
    best = int(torch.argmax(rayleigh))
    top = float(torch.linalg.eigvalsh(grams[best])[-1].clamp(min=0))
    level = top * (1.0 + delta)
    if level <= 0.0:
        level = torch.finfo(grams.real.dtype).tiny
    eye = torch.eye(r, dtype=grams.dtype, device=grams.device)
    _, info = torch.linalg.cholesky_ex(level * eye - grams)
    unproven = torch.nonzero(info != 0).reshape(-1)
    if unproven.numel():
        values = torch.linalg.eigvalsh(grams[unproven])[..., -1].clamp(min=0)
        worst = int(torch.argmax(values))
        if float(values[worst]) * (1.0 + delta) > level:
            level = float(values[worst]) * (1.0 + delta)
            best = int(unproven[worst])
    return math.sqrt(level), best


def top_pair(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, v, sigma_max): the top singular vectors and value of one matrix, so that
    sigma_max = Re(u^H M v) and d sigma_max = Re(u^H dM v) where sigma_max is simple. From the
    top eigenvector of the Gram on the smaller side (cheaper than an SVD)."""
    rows, cols = matrix.shape
    small_left = rows <= cols
    gram = matrix @ matrix.mH if small_left else matrix.mH @ matrix
    values, vectors = torch.linalg.eigh(gram)
    sigma = values[-1].clamp(min=0).sqrt()
    top = vectors[:, -1]
    value = float(sigma)  # the vectors carry no gradient: a Python scalar scales them
    scale = 1.0 / value if value > 0 else 0.0
    if small_left:
        return top, (matrix.mH @ top) * scale, sigma
    return (matrix @ top) * scale, top, sigma


def operator_norm_bound(module: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    """A certified upper bound of the operator norm of ``module`` on one input of
    ``input_shape`` (no batch axis: (C, n_1, ..., n_d) for a conv, (in_features,) or any
    (..., in_features) for Linear), differentiable with respect to the weight.

    Supported: ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` with zero padding (ints,
    tuples, 'same' or 'valid'), any stride, dilation and groups; ``nn.Linear`` (the spectral
    norm of its weight). A 0-d tensor on the weight's device, float64 for float64 weights,
    else float32.

    Value: the largest singular value over the DFT grid of the polyphase symbols of the strided
    circular convolution on the embedding grid m >= n + reach (half grid: real kernels have
    P(-f) = conj P(f); batched over frequencies and groups), plus a rounding margin, so it is
    >= the true zero-padded norm in exact arithmetic and after rounding. A ConvTranspose has the
    norm of the conv it is the adjoint of. Gradient: that of the largest singular value of the
    symbol attaining the maximum, Re(u^H dP v) (exact where that value is simple, a
    subgradient of the maximum otherwise); only that one symbol is built with autograd (the
    digits CNN's five bounds, forward and backward: ~3 ms on one CPU core).

    How tight (``tests/test_training.py``, 60 random layers with 1-3 spatial dimensions,
    strides 1-2, dilations 1-2, groups, padding from none to past 'same', ConvTranspose,
    inputs of 3-12 pixels, against the dense zero-padded operator): bound / true >= 1 every
    time, median 1.08, at most 3.4 (a 3-d, dilated kernel on a 4^3 input); the gap shrinks as
    the input grows (the zero-padded norm tends to the symbol's supremum, which the circulant
    samples). On the digits CNN's convolutions (8x8 and 4x4 inputs, 'same' 3x3): 1.03-1.13.
    """
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    real = complex_dtype(weight.dtype)[0]
    if isinstance(module, LINEAR_TYPES):
        with torch.no_grad():
            w = weight.detach().to(real)
            u, v, sigma = top_pair(w)
            rows, cols = w.shape
            # eigh's error on the Gram's top eigenvalue: ~(r + cols) eps sigma^2 (relative).
            eps = torch.finfo(real).eps
            value = sigma * (1.0 + 2.0 * (rows + cols + 2) * eps)
            margin = rounding_margin(w, 1, *w.shape)
        bound = value + margin
        if not weight.requires_grad:
            return bound
        return bound + ((u @ weight.to(real) @ v) - (u @ w @ v))
    plan = plan_of(module, input_shape)
    with torch.no_grad():
        w = weight.detach()
        stack = symbols(w, plan, half=True)
        top, flat = certified_top(stack)
        group, freq = divmod(flat, stack.shape[1])
        bound = torch.tensor(top, dtype=real, device=w.device) + rounding_margin(
            w, math.prod(plan.kernel), stack.shape[-2], stack.shape[-1])
        if not weight.requires_grad:
            return bound
        u, v, _ = top_pair(stack[group, freq])
    symbol = symbol_at(weight, plan, group, freq)
    sigma = (u.conj() @ symbol @ v).real
    return bound + (sigma - sigma.detach())


def symbol_at(weight: torch.Tensor, plan: ConvPlan, group: int, freq: int) -> torch.Tensor:
    """One transposed half-grid symbol, (S * c_in, c_out) of ``group`` at flat frequency
    ``freq``: the same entry of ``symbols``, built alone (differentiable)."""
    real, cplx = complex_dtype(weight.dtype)
    phases = phase_tensor(plan, True, weight.device, cplx)[freq * plan.n_phase:
                                                          (freq + 1) * plan.n_phase]
    co, ci = plan.c_out, plan.c_in
    taps = math.prod(plan.kernel)
    w = weight.to(real).reshape(plan.groups, co, ci, taps)[group]
    x = phases @ w.permute(1, 0, 2).reshape(ci * co, taps).to(cplx).T  # (S, ci * co)
    return x.reshape(plan.n_phase * ci, co)


# --------------------------------------------------------------------------- clipping


def project_symbols(clipped: torch.Tensor, plan: ConvPlan, weight_shape: torch.Size
                    ) -> torch.Tensor:
    """The kernel (of the plan's support) whose full-grid symbols are nearest to ``clipped``
    (groups, F, S * c_in, c_out) in Frobenius norm: the phase columns of distinct taps are
    orthogonal on the full grid, each of squared norm F (no two taps alias on an embedding
    grid), so this is the inverse DFT at the taps, real part."""
    phases = phase_tensor(plan, False, clipped.device, clipped.dtype)
    g, co, ci = plan.groups, plan.c_out, plan.c_in
    n_freq = clipped.shape[1]
    x = clipped.reshape(g, n_freq, plan.n_phase, ci, co).permute(1, 2, 0, 3, 4)
    x = x.reshape(n_freq * plan.n_phase, g * ci * co)
    taps_by_channel = (phases.mH @ x).real / n_freq  # (taps, g * ci * co)
    w = taps_by_channel.T.reshape(g, ci, co, -1).permute(0, 2, 1, 3)
    return w.reshape(weight_shape)


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
    bound = float(operator_norm_bound(module, input_shape))
    if bound <= max_norm:
        return bound
    if isinstance(module, LINEAR_TYPES):
        real = complex_dtype(weight.dtype)[0]
        weight.copy_(clip_symbols(weight.to(real), max_norm).to(weight.dtype))
    else:
        plan = plan_of(module, input_shape)
        for _ in range(iterations):
            clipped = clip_symbols(symbols(weight, plan, half=False), max_norm)
            weight.copy_(project_symbols(clipped, plan, weight.shape).to(weight.dtype))
            bound = float(operator_norm_bound(module, input_shape))
            if bound <= max_norm:
                return bound
    return scale_to_bound_(module, max_norm, input_shape)


def scale_to_bound_(module: Any, max_norm: float, input_shape: tuple[int, ...]) -> float:
    """Scale the weight until its certified bound is <= ``max_norm`` (one step, a second
    only if rounding left it a hair above); returns the bound."""
    weight = module.weight
    bound = float(operator_norm_bound(module, input_shape))
    for attempt in range(4):
        if bound <= max_norm:
            return bound
        weight.mul_(max_norm / bound * (1.0 - 1e-6 * 10**attempt))
        bound = float(operator_norm_bound(module, input_shape))
    if bound > max_norm:
        raise SpecprofError(f"could not bring the bound {bound:.6g} below {max_norm}",
                            "the weight may contain NaN or Inf")
    return bound
