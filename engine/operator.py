"""The true linear map of a layer on one input, built with NumPy/SciPy only.

A ``Conv`` is a *gather*: output position o reads input position ``o*s + k*d - pad_begin`` for
each tap k. A ``ConvTranspose`` is the adjoint (a *scatter*) of the convolution whose weight is
its own weight read in Conv layout (``(c_in, c_out/g, k...)`` is a conv from c_out to c_in
channels), on the transposed layer's output grid. So both ops are described by one object, the
*gather table* of that conv: for every conv output position and tap, the flat index of the input
position it reads (or a sentinel for "outside the input, reads zero"). Everything here (the
sparse matrix, the dense matrix, the matrix-free apply and its adjoint) is built from that table,
which ``ConvGeometry`` (the conv's sizes, strides, dilations and pads) computes. The ``toeplitz``
backend works with the same ``ConvGeometry``.

Boundaries:
- ``zeros``: exactly what ONNX/torch compute, output sizes by their formulas.
- ``circular``: the periodic operator on the n-grid (Sedghi et al. 2019): input indices are taken
  mod n, a conv has ceil(n/s) outputs per dimension, and a ConvTranspose is the adjoint of the
  circular conv on the grid of size n*s. The pad only shifts the input circularly, which does not
  change the singular values; it is applied anyway so the map matches the zero-padded one inside.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from specprof.engine.errors import InputShapeError
from specprof.engine.parallel import default_threads, in_threads
from specprof.engine.types import Boundary, Layer

if TYPE_CHECKING:
    import scipy.sparse as sp

_CHUNK_BYTES = 128 * 2**20
"""Largest im2col buffer one matrix-free product allocates; bigger products are chunked."""


def _check_conv_input(layer: Layer) -> tuple[int, ...]:
    """The layer's spatial input shape, after checking it fits the weight."""
    if layer.input_shape is None:
        raise InputShapeError(
            f"layer {layer.name}: input size unknown",
            "pass --input-shape C,H,W (the layer's operator depends on it)",
        )
    shape = tuple(int(n) for n in layer.input_shape)
    if len(shape) != layer.spatial_dims + 1:
        raise InputShapeError(
            f"layer {layer.name}: input shape {shape} has {len(shape) - 1} spatial dimensions, "
            f"the kernel has {layer.spatial_dims}",
            "pass --input-shape as C followed by one size per spatial dimension",
        )
    if shape[0] != layer.in_channels:
        raise InputShapeError(
            f"layer {layer.name}: input has {shape[0]} channels, the weight expects "
            f"{layer.in_channels}",
            "check --input-shape (C comes first)",
        )
    if min(shape[1:], default=1) < 1:
        raise InputShapeError(f"layer {layer.name}: empty input shape {shape}",
                              "pass positive sizes in --input-shape")
    return shape[1:]


def output_spatial_shape(layer: Layer, boundary: Boundary = "zeros") -> tuple[int, ...]:
    """Spatial size of the layer's output on one input of ``layer.input_shape``.

    Raises ``InputShapeError`` if the input shape is unknown, does not fit, or is too small for
    the kernel (zero padding).
    """
    spatial = _check_conv_input(layer)
    d = layer.spatial_dims
    out = []
    for axis, n in enumerate(spatial):
        k, s, dil = layer.kernel_shape[axis], layer.strides[axis], layer.dilations[axis]
        pb, pe = layer.pads[axis], layer.pads[axis + d]
        if layer.op_type == "Conv":
            size = -(-n // s) if boundary == "circular" else (n + pb + pe - dil * (k - 1) - 1) // s + 1
        elif boundary == "circular":
            size = n * s
        else:
            size = s * (n - 1) + layer.output_padding[axis] + dil * (k - 1) + 1 - pb - pe
        if size < 1:
            raise InputShapeError(
                f"layer {layer.name}: input {spatial} is too small for the kernel "
                f"{layer.kernel_shape} (output size {size} along axis {axis})",
                "pass a larger --input-shape",
            )
        out.append(size)
    return tuple(out)


def operator_shape(layer: Layer, boundary: Boundary = "zeros") -> tuple[int, int]:
    """(rows, cols) of the layer's matrix: (output size, input size) of one sample."""
    if not layer.is_conv:
        rows, cols = layer.weight.shape
        return int(rows), int(cols)
    out = output_spatial_shape(layer, boundary)
    return layer.out_channels * math.prod(out), layer.input_size or 0


@dataclass(frozen=True, eq=False)
class ConvGeometry:
    """The convolution a layer is (Conv) or is the adjoint of (ConvTranspose), on one input.

    ``weight`` is (c_out, c_in / groups, k_1..k_d), float64, in Conv layout (a ConvTranspose's
    own weight (c_in, c_out/g, k) read as a conv from its output to its input channels). The
    conv maps x of shape (c_in, n_1..n_d) to y of shape (c_out, out_1..out_d) with
    y[o, p] = sum_{c, a} W[o, c, a] x[c, s p + dil a - pad_begin], x read as zero outside the
    grid (``boundary="zeros"``) or modulo n (``"circular"``). ``transposed`` says the layer's
    map is the adjoint of this conv. ``table`` is the conv's gather table (computed once, when
    first asked for).
    """

    weight: np.ndarray
    groups: int
    n: tuple[int, ...]
    out: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pad_begin: tuple[int, ...]
    pad_end: tuple[int, ...]
    boundary: Boundary = "zeros"
    transposed: bool = False

    @property
    def d(self) -> int:
        return len(self.n)

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def c_out(self) -> int:
        return int(self.weight.shape[0])

    @property
    def c_in(self) -> int:
        return int(self.weight.shape[1]) * self.groups

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the conv's matrix (the layer's, transposed if ``transposed``)."""
        return self.c_out * math.prod(self.out), self.c_in * math.prod(self.n)

    @property
    def n_values(self) -> int:
        return min(self.shape)

    def grouped_weight(self) -> np.ndarray:
        """(groups, c_out/groups, c_in/groups, k...)."""
        w = self.weight
        return w.reshape(self.groups, w.shape[0] // self.groups, *w.shape[1:])

    @property
    def sentinel(self) -> int:
        """The ``table`` entry for a tap that reads padding: one past the last input position."""
        return math.prod(self.n)

    @cached_property
    def table(self) -> np.ndarray:
        """``table[o, t]``: the flat input position (over ``n``) that output position o (flat,
        over ``out``) reads at tap t (flat, over the kernel), or ``sentinel`` for padding."""
        d = self.d
        axes = [_axis_table(self.out[a], self.n[a], self.kernel[a], self.strides[a],
                            self.dilations[a], self.pad_begin[a], self.boundary == "circular")
                for a in range(d)]
        # Cartesian product over axes: broadcast axis a's table to (out_1..out_d, k_1..k_d).
        flat = np.zeros([1] * (2 * d), dtype=np.int64)
        valid = np.ones([1] * (2 * d), dtype=bool)
        step = 1
        for a in reversed(range(d)):
            shape = [1] * (2 * d)
            shape[a], shape[d + a] = axes[a].shape
            table = axes[a].reshape(shape)
            flat = flat + table * step
            valid = valid & (table >= 0)
            step *= self.n[a]
        return np.where(valid, flat, self.sentinel).reshape(math.prod(self.out), -1)


def _axis_table(n_out: int, n_in: int, kernel: int, stride: int, dilation: int, shift: int,
                circular: bool) -> np.ndarray:
    """(n_out, kernel) input indices read by a 1-d conv; -1 where it reads padding."""
    index = (np.arange(n_out)[:, None] * stride + np.arange(kernel)[None, :] * dilation - shift)
    if circular:
        return index % n_in
    return np.where((index >= 0) & (index < n_in), index, -1)


def conv_geometry(layer: Layer, boundary: Boundary = "zeros") -> ConvGeometry:
    """The conv ``layer`` (a Conv or ConvTranspose) is or is the adjoint of, for ``boundary``.

    A ConvTranspose with weight (c_in, c_out/g, k) on an n-grid is the adjoint of the Conv with
    the same weight array (read as (c_out', c_in'/g, k)) and the same strides, dilations and
    pads, on the ConvTranspose's output grid (``output_spatial_shape``); that Conv has the
    ConvTranspose's input grid as output, and adjoints share singular values. Raises
    ``InputShapeError`` where the input shape is unknown or does not fit.
    """
    if not layer.is_conv:
        raise ValueError(f"{layer.op_type} is not a convolution")
    spatial = _check_conv_input(layer)
    out = output_spatial_shape(layer, boundary)
    transposed = layer.op_type == "ConvTranspose"
    # The conv side: a ConvTranspose reads its output grid (as conv input) into its input grid.
    conv_out, conv_in = (spatial, out) if transposed else (out, spatial)
    d = layer.spatial_dims
    return ConvGeometry(weight=np.asarray(layer.weight, dtype=np.float64), groups=layer.groups,
                        n=tuple(conv_in), out=tuple(conv_out), strides=tuple(layer.strides),
                        dilations=tuple(layer.dilations), pad_begin=tuple(layer.pads[:d]),
                        pad_end=tuple(layer.pads[d:]), boundary=boundary,
                        transposed=transposed)


def _conv_side_sparse(geo: ConvGeometry) -> sp.csr_matrix:
    """CSR matrix of the conv side (gather), duplicates (circular wrap) summed."""
    import scipy.sparse as sp

    o_idx, t_idx = np.nonzero(geo.table != geo.sentinel)
    i_idx = geo.table[o_idx, t_idx]
    n_out, n_in = math.prod(geo.out), math.prod(geo.n)
    c_out, cin_g, g = geo.c_out, int(geo.weight.shape[1]), geo.groups
    cout_g = c_out // g
    co = np.arange(c_out)
    ci = (co // cout_g)[:, None] * cin_g + np.arange(cin_g)[None, :]  # (c_out, cin_g)
    weight = geo.weight.reshape(c_out, cin_g, -1).astype(np.float64)
    values = weight[:, :, t_idx]  # (c_out, cin_g, nnz_spatial)
    rows = co[:, None, None] * n_out + o_idx[None, None, :]
    cols = ci[:, :, None] * n_in + i_idx[None, None, :]
    rows = np.broadcast_to(rows, values.shape).ravel()
    cols = np.broadcast_to(cols, values.shape).ravel()
    shape = (c_out * n_out, geo.c_in * n_in)
    # coo -> csr sums duplicate (row, col) pairs: a kernel larger than a circular input wraps.
    return sp.coo_matrix((values.ravel(), (rows, cols)), shape=shape).tocsr()


def sparse_operator(layer: Layer, boundary: Boundary = "zeros") -> sp.csr_matrix:
    """The layer's matrix (rows: output, cols: input, C-order flattening) as float64 CSR."""
    import scipy.sparse as sp

    if not layer.is_conv:
        return sp.csr_matrix(np.asarray(layer.weight, dtype=np.float64))
    geo = conv_geometry(layer, boundary)
    matrix = _conv_side_sparse(geo)
    return matrix.T.tocsr() if geo.transposed else matrix


def dense_operator(layer: Layer, boundary: Boundary = "zeros") -> np.ndarray:
    """The layer's matrix as a dense float64 array (small layers only)."""
    if not layer.is_conv:
        return np.array(layer.weight, dtype=np.float64)
    return sparse_operator(layer, boundary).toarray()


class ConvApply:
    """Matrix-free product with a conv layer's matrix and its adjoint (im2col + matmul).

    Memory is the im2col buffer (input channels x taps x output positions), chunked over
    output positions to stay below ~128 MiB, never the operator itself.
    """

    def __init__(self, layer: Layer | ConvGeometry, boundary: Boundary = "zeros",
                 dtype: type = np.float64) -> None:
        """The map of ``layer``, or of the conv side of a ``ConvGeometry`` (whose own
        ``boundary`` and ``transposed`` then hold)."""
        self.geo = layer if isinstance(layer, ConvGeometry) else conv_geometry(layer, boundary)
        self.dtype = np.dtype(dtype)
        geo = self.geo
        g, cout_g = geo.groups, geo.c_out // geo.groups
        cin_g = int(geo.weight.shape[1])
        self._taps = geo.table.shape[1]
        # (g, cout_g, cin_g * taps): one matmul per group.
        self._w = geo.weight.astype(self.dtype).reshape(g, cout_g, cin_g * self._taps)
        self._n_out, self._n_in = math.prod(geo.out), math.prod(geo.n)
        per_position = geo.c_in * self._taps * self.dtype.itemsize
        self._chunk = max(1, _CHUNK_BYTES // max(per_position, 1))
        conv_rows = geo.c_out * self._n_out
        conv_cols = geo.c_in * self._n_in
        self.shape = (conv_cols, conv_rows) if geo.transposed else (conv_rows, conv_cols)

    def _gather(self, x: np.ndarray) -> np.ndarray:
        """The conv side: (c_in_conv * n_in,) -> (c_out_conv * n_out,)."""
        geo = self.geo
        g, cin = geo.groups, geo.c_in
        padded = np.zeros((cin, self._n_in + 1), dtype=self.dtype)
        padded[:, :-1] = x.reshape(cin, self._n_in)
        out = np.empty((geo.c_out, self._n_out), dtype=self.dtype)
        for start in range(0, self._n_out, self._chunk):
            stop = min(start + self._chunk, self._n_out)
            # (cin, taps, positions); np.take: 5x faster than the same fancy index here
            cols = np.take(padded, geo.table[start:stop].T, axis=1)
            cols = cols.reshape(g, -1, stop - start)
            out[:, start:stop] = np.matmul(self._w, cols).reshape(-1, stop - start)
        return out.ravel()

    def _scatter(self, y: np.ndarray) -> np.ndarray:
        """The adjoint of ``_gather``: (c_out_conv * n_out,) -> (c_in_conv * n_in,)."""
        geo = self.geo
        g, cin = geo.groups, geo.c_in
        y = y.reshape(g, -1, self._n_out)
        width = self._n_in + 1
        out = np.zeros(cin * width, dtype=np.float64)
        offsets = (np.arange(cin) * width)[:, None, None]
        w_t = np.swapaxes(self._w, 1, 2)
        for start in range(0, self._n_out, self._chunk):
            stop = min(start + self._chunk, self._n_out)
            cols = np.matmul(w_t, y[:, :, start:stop]).reshape(cin, self._taps, stop - start)
            index = offsets + geo.table[start:stop].T[None, :, :]
            out += np.bincount(index.ravel(), weights=cols.ravel(), minlength=cin * width)
        return out.reshape(cin, width)[:, :-1].ravel().astype(self.dtype, copy=False)

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """The layer's map on one flattened input."""
        x = np.asarray(x, dtype=self.dtype).ravel()
        return self._scatter(x) if self.geo.transposed else self._gather(x)

    def rmatvec(self, y: np.ndarray) -> np.ndarray:
        """The adjoint (transpose) of the layer's map on one flattened output."""
        y = np.asarray(y, dtype=self.dtype).ravel()
        return self._gather(y) if self.geo.transposed else self._scatter(y)


def embedding_grid(geom: ConvGeometry, extra: int = 0) -> tuple[int, ...]:
    """Per dimension, the smallest m (a multiple of the stride, plus ``extra`` strides) such
    that the zero-padded convolution is a row/column restriction of the strided circular
    convolution on the m-grid: m >= n + min(pad_begin, reach) + min(pad_end, reach), reach =
    dilation (k - 1). Its circulant's norm is then a certified upper bound on the zero-padded
    operator's. In polyphase units (m / s)."""
    sizes = []
    for n, s, dl, k, pb, pe in zip(geom.n, geom.strides, geom.dilations, geom.kernel,
                                   geom.pad_begin, geom.pad_end, strict=True):
        reach = dl * (k - 1)
        m = n + min(pb, reach) + min(pe, reach)
        sizes.append(-(-m // s) + extra)
    return tuple(sizes)


def apply_pair_flops(geometry: ConvGeometry) -> float:
    """Nominal flops (seconds at ``NOMINAL_FLOPS`` x 1e10) of one ``ConvApply`` product with the
    conv of ``geometry`` and one with its adjoint, as measured on one core: two GEMMs of
    2 c_out (c_in/g) taps flops per output position, which run at BLAS speed (~4x
    ``NOMINAL_FLOPS``), and the im2col gather and its ``bincount`` scatter, memory-bound at
    ~65 nominal flops per im2col entry (c_in taps per output position)."""
    positions = math.prod(geometry.out)
    taps = math.prod(geometry.kernel)
    entries = geometry.c_in * taps * positions
    gemm = 2.0 * geometry.c_out * (geometry.c_in // geometry.groups) * taps * positions
    return 0.256 * 2 * gemm + 65.0 * entries


def group_blocks(layer: Layer) -> list[Layer]:
    """The groups of a grouped convolution as ungrouped layers (the layer itself if g = 1).

    With groups, output channels of group j read only input channels of group j, so the
    operator is block diagonal up to a permutation of rows and columns: its singular values are
    the union of the blocks'. All blocks have the same shape.
    """
    if not layer.is_conv or layer.groups == 1:
        return [layer]
    g = layer.groups
    in_per_group = layer.in_channels // g
    per_group = layer.weight.shape[0] // g  # Conv: c_out/g filters; ConvTranspose: c_in/g rows
    shape = None if layer.input_shape is None else (in_per_group, *layer.input_shape[1:])
    return [
        replace(layer, name=f"{layer.name}[group {j}]", groups=1, bias=None, input_shape=shape,
                weight=layer.weight[j * per_group:(j + 1) * per_group])
        for j in range(g)
    ]


def torch_available() -> bool:
    """Whether torch can be imported (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


class TorchConvApply:
    """Products with a zero-padded convolution and its adjoint through torch's own
    ``conv{1,2,3}d`` / ``conv_transpose{1,2,3}d`` (oneDNN kernels in float32: 10-50x faster
    than ``ConvApply`` on ResNet layers, measured on 2 cores).

    The map is the conv side of ``geometry`` (``transposed`` is ignored: a ConvTranspose has
    the singular values of the conv it is the adjoint of); zero boundary, non-negative pads.
    Asymmetric pads are applied with an explicit ``F.pad``; the adjoint is the transposed
    convolution on the padded grid (``output_padding`` makes its size n + pads exactly), then
    cropped. ``matvec``/``rmatvec`` take and return flat float64 NumPy vectors; the arithmetic
    is in ``dtype`` (float32 by default: the solver that uses it checks its answers with
    float64 products, ``ConvApply``). An ungrouped conv is split by output channels over
    ``threads`` worker threads (``in_threads``), meant to run with torch on one thread each
    (``one_torch_thread``): torch's own thread pool was 10x slower on a loaded machine."""

    def __init__(self, geometry: ConvGeometry, dtype: str = "float32",
                 threads: int | None = None) -> None:
        import torch

        self.threads = default_threads() if threads is None else threads
        if geometry.boundary != "zeros" or min(geometry.pad_begin + geometry.pad_end) < 0:
            raise ValueError("TorchConvApply needs zero padding with non-negative pads")
        self.geo = geometry
        self._torch = torch
        self._dtype = torch.float32 if dtype == "float32" else torch.float64
        self._w = torch.from_numpy(np.array(geometry.weight, dtype=np.float64)).to(self._dtype)
        d = geometry.d
        functional = torch.nn.functional
        self._conv = (functional.conv1d, functional.conv2d, functional.conv3d)[d - 1]
        self._conv_t = (functional.conv_transpose1d, functional.conv_transpose2d,
                        functional.conv_transpose3d)[d - 1]
        # F.pad lists (begin, end) pairs from the last dimension to the first.
        self._pads = [p for axis in reversed(range(d))
                      for p in (geometry.pad_begin[axis], geometry.pad_end[axis])]
        padded = [n + b + e for n, b, e in zip(geometry.n, geometry.pad_begin, geometry.pad_end,
                                              strict=True)]
        self._output_padding = tuple(
            size - ((o - 1) * s + dl * (k - 1) + 1)
            for size, o, s, dl, k in zip(padded, geometry.out, geometry.strides,
                                         geometry.dilations, geometry.kernel, strict=True))
        self._crop = (slice(None), slice(None), *(slice(b, b + n) for b, n in
                                                  zip(geometry.pad_begin, geometry.n,
                                                      strict=True)))
        self.shape = (geometry.c_out * math.prod(geometry.out),
                      geometry.c_in * math.prod(geometry.n))

    def _split(self) -> list[slice]:
        """Output-channel blocks, one per worker thread (ungrouped convs only)."""
        c_out = self.geo.c_out
        if self.geo.groups != 1 or self.threads <= 1 or c_out < 2 * self.threads:
            return [slice(0, c_out)]
        step = -(-c_out // self.threads)
        return [slice(start, min(start + step, c_out)) for start in range(0, c_out, step)]

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """A x on one flattened input."""
        geo, torch = self.geo, self._torch
        tensor = torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(1, geo.c_in, *geo.n))
        with torch.no_grad():
            tensor = torch.nn.functional.pad(tensor.to(self._dtype), self._pads)
            parts = in_threads([lambda block=block: self._conv(
                tensor, self._w[block], stride=geo.strides, dilation=geo.dilations,
                groups=geo.groups) for block in self._split()], self.threads)
            y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return y.to(torch.float64).numpy().ravel()

    def rmatvec(self, y: np.ndarray) -> np.ndarray:
        """A^T y on one flattened output."""
        geo, torch = self.geo, self._torch
        tensor = torch.from_numpy(np.asarray(y, dtype=np.float64).reshape(1, geo.c_out, *geo.out))
        with torch.no_grad():
            tensor = tensor.to(self._dtype)
            parts = in_threads([lambda block=block: self._conv_t(
                tensor[:, block], self._w[block], stride=geo.strides, dilation=geo.dilations,
                groups=geo.groups, output_padding=self._output_padding)
                for block in self._split()], self.threads)
            x = parts[0]
            for part in parts[1:]:
                x = x + part
        return np.ascontiguousarray(x[self._crop].to(torch.float64).numpy()).ravel()


def fast_conv_apply(geometry: ConvGeometry) -> ConvApply | TorchConvApply:
    """The fastest product with the zero-padded conv side of ``geometry`` on this machine:
    torch's float32 convolutions when torch is installed, else ``ConvApply`` in float64."""
    conv_side = replace(geometry, transposed=False)
    if uses_torch(geometry) and geometry.boundary == "zeros" and min(
            geometry.pad_begin + geometry.pad_end, default=0) >= 0:
        return TorchConvApply(conv_side)
    return ConvApply(conv_side)


TORCH_WORTH_FLOPS = 5e7
"""``apply_pair_flops`` of one product pair above which ``fast_conv_apply`` imports torch (if
torch is not imported yet): importing it takes 1.5-2.5 s, which ~50 NumPy product pairs of
a layer this size (~0.3 s at these flops) do not repay; a 16->32 3x3 layer at 16x16 took
5 s with torch's import against 0.06 s without. Once torch is imported it is always used."""


def uses_torch(geometry: ConvGeometry) -> bool:
    """Whether ``fast_conv_apply`` takes torch's convolutions for ``geometry``: torch is
    installed, and already imported or worth importing for this layer (``TORCH_WORTH_FLOPS``)."""
    if "torch" in sys.modules:
        return True
    return torch_available() and apply_pair_flops(geometry) >= TORCH_WORTH_FLOPS


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """A context in which torch (if it is already imported) runs its kernels on one thread.

    torch's OpenMP pool, on top of NumPy's and SciPy's BLAS pools, slowed its convolutions
    10x on this project's loaded 2-core machine (0.32 s against 0.037 s for a 64->64 3x3
    product and its adjoint at 56x56), so the solvers run it on one thread, like the BLAS
    (``specprof.engine.parallel``)."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fast_pair_flops(geometry: ConvGeometry) -> float:
    """Nominal flops of one ``fast_conv_apply`` product and its adjoint: with torch, two
    float32 oneDNN convolutions at ~8x ``NOMINAL_FLOPS`` on one thread plus ~8 nominal flops
    per input and output entry (copies, padding); without it, ``apply_pair_flops``."""
    if not uses_torch(geometry):
        return apply_pair_flops(geometry)
    positions = math.prod(geometry.out)
    taps = math.prod(geometry.kernel)
    gemm = 2.0 * geometry.c_out * (geometry.c_in // geometry.groups) * taps * positions
    return 2 * gemm / 8 + 8.0 * sum(geometry.shape)
