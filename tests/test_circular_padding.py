"""Circular padding in the model: Pad(mode="wrap") before a Conv becomes a circular layer,
and ``auto`` profiles it exactly with fft-circulant (checked against torch's circular conv)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracle import singular_values

import specprof
from specprof.engine.loading import load_model

RNG = np.random.default_rng(11)
WEIGHT = RNG.normal(size=(3, 2, 3, 3))


def _wrap_model(pad: int, opset: int = 19) -> onnx.ModelProto:
    """x (1,2,6,6) -> Pad(wrap, `pad` on each spatial side) -> Conv 3x3 (no pads)."""
    pads = np.array([0, 0, pad, pad, 0, 0, pad, pad], dtype=np.int64)
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], name="wrap", mode="wrap"),
             helper.make_node("Conv", ["p", "W"], ["y"], name="conv")]
    size = 6 + 2 * pad - 2
    graph = helper.make_graph(
        nodes, "wrapped", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, size, size])],
        initializer=[numpy_helper.from_array(pads, "pads"),
                     numpy_helper.from_array(WEIGHT.astype(np.float32), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _torch_circular_matrix(weight: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """What torch computes for Conv2d(padding=1, padding_mode='circular'), pushed basis by basis."""
    torch = pytest.importorskip("torch")
    n = int(np.prod(shape))
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    padded = torch.nn.functional.pad(basis, (1, 1, 1, 1), mode="circular")
    out = torch.nn.functional.conv2d(padded, torch.tensor(weight, dtype=torch.float64))
    return out.reshape(n, -1).T.numpy()


def test_wrap_pad_before_a_conv_is_a_circular_layer(tmp_path: Path) -> None:
    path = tmp_path / "wrap.onnx"
    onnx.save(_wrap_model(1), path)
    (layer,) = load_model(path).layers
    assert layer.padding_mode == "circular"
    assert layer.input_shape == (2, 6, 6) and layer.pads == (1, 1, 1, 1)
    assert "circular" in layer.describe()


def test_auto_profiles_the_circular_layer_exactly(tmp_path: Path) -> None:
    path = tmp_path / "wrap.onnx"
    onnx.save(_wrap_model(1), path)
    frame = specprof.profile(path, db=f"sqlite:///{tmp_path}/db.sqlite")
    # either exact backend (auto takes the cheaper by its estimate), on the circular operator
    assert frame.backend.tolist()[0] in ("fft-circulant", "exact")
    assert "cheapest exact" in frame.reason[0]
    stored = specprof.query(db=f"sqlite:///{tmp_path}/db.sqlite", values=True)
    truth = singular_values(_torch_circular_matrix(WEIGHT.astype(np.float32).astype(float),
                                                   (2, 6, 6)))
    assert stored.boundary.tolist() == ["circular"]
    np.testing.assert_allclose(stored.singular_values[0], truth, rtol=0, atol=1e-10 * truth[0])


def test_boundary_zeros_overrides_the_model(tmp_path: Path) -> None:
    path = tmp_path / "wrap.onnx"
    onnx.save(_wrap_model(1), path)
    frame = specprof.profile(path, db=f"sqlite:///{tmp_path}/db.sqlite", boundary="zeros",
                             backend="exact")
    assert frame.status.tolist() == ["ok"]
    stored = specprof.query(db=f"sqlite:///{tmp_path}/db.sqlite")
    assert stored.boundary.tolist() == ["zeros"]


def test_a_wrap_that_is_not_same_padding_stays_as_the_graph_says(tmp_path: Path) -> None:
    path = tmp_path / "wrap2.onnx"
    onnx.save(_wrap_model(2), path)
    (layer,) = load_model(path).layers
    assert layer.padding_mode == "zeros" and layer.input_shape == (2, 10, 10)


def test_torch_module_with_circular_padding(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular").eval()
    (layer,) = load_model(module, input_shape=(2, 6, 6)).layers
    assert layer.padding_mode == "circular" and layer.input_shape == (2, 6, 6)
    spectrum = specprof.singular_values(layer)
    weight = module.weight.detach().double().numpy()
    truth = singular_values(_torch_circular_matrix(weight, (2, 6, 6)))
    np.testing.assert_allclose(spectrum.expanded(), truth, rtol=0, atol=1e-6 * truth[0])
