"""Independent oracle: the dense matrix of a layer, built by pushing the identity basis
through torch's own convolution functions. Nothing here uses specprof's code."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _basis(input_shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(input_shape)
    return torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)


def conv_matrix(weight: np.ndarray, input_shape: tuple[int, ...], *, stride=1, padding=0,
                dilation=1, groups=1, circular: bool = False) -> np.ndarray:
    """Dense matrix of torch's conv{1,2,3}d on one input of ``input_shape`` = (C, *spatial).

    ``padding`` is an int or a per-dimension tuple of symmetric pads (torch's convention).
    ``circular`` treats the input as periodic: the output is the full periodic correlation on
    the n-grid (ceil(n/stride) outputs per dimension), built by tiling the input.
    """
    w = torch.tensor(np.asarray(weight, dtype=np.float64))
    d = w.ndim - 2
    x = _basis(input_shape)
    if circular:
        spatial = input_shape[1:]
        dil = (dilation,) * d if isinstance(dilation, int) else tuple(dilation)
        st = (stride,) * d if isinstance(stride, int) else tuple(stride)
        # Output o reads input (o*s + k*dil) mod n: tile the input often enough that the last
        # output's last tap still lands inside the tiled copy (kernels may exceed n).
        span = [dl * (k - 1) for dl, k in zip(dil, w.shape[2:], strict=False)]
        repeats = [-(-(n + sp) // n) for n, sp in zip(spatial, span, strict=False)]
        x = x.repeat(1, 1, *repeats)
        y = _CONV[d](x, w, stride=1, padding=0, dilation=dil, groups=groups)
        index = tuple(slice(0, n, s) for n, s in zip(spatial, st, strict=False))
        y = y[(slice(None), slice(None), *index)]
    else:
        y = _CONV[d](x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return y.reshape(x.shape[0], -1).T.numpy()


def conv_transpose_matrix(weight: np.ndarray, input_shape: tuple[int, ...], *, stride=1,
                          padding=0, output_padding=0, dilation=1, groups=1) -> np.ndarray:
    """Dense matrix of torch's conv_transpose{1,2,3}d on one input of ``input_shape``."""
    w = torch.tensor(np.asarray(weight, dtype=np.float64))
    d = w.ndim - 2
    x = _basis(input_shape)
    y = _CONV_T[d](x, w, stride=stride, padding=padding, output_padding=output_padding,
                   groups=groups, dilation=dilation)
    return y.reshape(x.shape[0], -1).T.numpy()


def singular_values(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.svd(matrix, compute_uv=False)
