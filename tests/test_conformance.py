"""Every built-in plugin passes the conformance suites specprof ships for third parties
(``specprof.testing``); the backends here with the torch oracle (identity basis pushed through
torch's convolutions) instead of specprof's own dense operator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from oracle import conv_matrix, conv_transpose_matrix

from specprof.engine.base import ImportOptions
from specprof.engine.types import Boundary, Layer
from specprof.plugins.analyzers.spectral import SpectralAnalyzer
from specprof.plugins.backends.exact import ExactBackend
from specprof.plugins.backends.fft_circulant import FftCirculantBackend
from specprof.plugins.backends.filter import FilterBackend
from specprof.plugins.backends.toeplitz import ToeplitzBackend
from specprof.plugins.importers.onnx_importer import OnnxImporter
from specprof.plugins.importers.torch_importer import TorchImporter
from specprof.testing import (
    AnalyzerConformance,
    BackendConformance,
    ImporterConformance,
    small_onnx_model,
)


def torch_oracle(layer: Layer, boundary: Boundary) -> np.ndarray:
    """Dense matrix of a zoo layer (symmetric pads) by torch, for either boundary."""
    if not layer.is_conv:
        return np.asarray(layer.weight, dtype=np.float64)
    d = layer.spatial_dims
    weight = np.asarray(layer.weight, dtype=np.float64)
    common = {"stride": layer.strides, "dilation": layer.dilations, "groups": layer.groups}
    if layer.op_type == "Conv":
        if boundary == "circular":
            return conv_matrix(weight, layer.input_shape, circular=True, **common)
        return conv_matrix(weight, layer.input_shape, padding=layer.pads[:d], **common)
    if boundary == "circular":
        # The adjoint of the circular conv (c_out -> c_in channels) on the n*s grid.
        grid = tuple(n * s for n, s in zip(layer.input_shape[1:], layer.strides, strict=False))
        return conv_matrix(weight, (layer.out_channels, *grid), circular=True, **common).T
    return conv_transpose_matrix(weight, layer.input_shape, padding=layer.pads[:d],
                                 output_padding=layer.output_padding, **common)


class TorchOracle:
    def oracle_matrix(self, layer: Layer, boundary: Boundary) -> np.ndarray:
        return torch_oracle(layer, boundary)


class TestExactConformance(TorchOracle, BackendConformance):
    backend_class = ExactBackend
    min_supported = 30


class TestFilterConformance(TorchOracle, BackendConformance):
    backend_class = FilterBackend
    min_supported = 30


class TestFftCirculantConformance(TorchOracle, BackendConformance):
    backend_class = FftCirculantBackend
    boundaries = ("circular",)
    min_supported = 14


class TestToeplitzConformance(TorchOracle, BackendConformance):
    backend_class = ToeplitzBackend
    boundaries = ("zeros",)
    min_supported = 13


class TestOnnxImporterConformance(ImporterConformance):
    importer_class = OnnxImporter
    min_layers = 2

    def sample(self, tmp_path: Path) -> Path:
        path = tmp_path / "small.onnx"
        onnx.save(small_onnx_model(), path)
        return path


class TestTorchImporterConformance(ImporterConformance):
    importer_class = TorchImporter
    options = ImportOptions(input_shape=(3, 8, 8))
    min_layers = 2

    def sample(self, tmp_path: Path) -> object:
        import torch

        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.Flatten(), torch.nn.Linear(256, 10))


class TestSpectralAnalyzerConformance(AnalyzerConformance):
    analyzer_class = SpectralAnalyzer
