"""load_model end to end: choosing importers, ONNX files (external data kept in their folder),
and PyTorch modules, TorchScript, exported programs and state_dicts."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from models import SMALL_CNN_INPUT, SMALL_TORCH_CNN_SOURCE, seeded, small_cnn

from specprof.engine.base import ImportOptions
from specprof.engine.errors import InputShapeError, MissingExtraError, ModelLoadError
from specprof.engine.loading import load_model, parse_input_shape
from specprof.engine.plugins import Registry, get_plugin_manager
from specprof.plugins.importers.onnx_importer import OnnxImporter
from specprof.plugins.importers.torch_importer import TorchImporter, archive_kind

IMPORTERS = ("specprof.plugins.importers.onnx_importer",
             "specprof.plugins.importers.torch_importer")


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.from_manager(get_plugin_manager(default_plugins=IMPORTERS, entry_points=False))


def _hashes(model) -> list[str]:
    return [layer.content_hash for layer in model.layers]


def test_registry_holds_both_importers(registry):
    assert registry.importers == {"onnx": OnnxImporter, "torch": TorchImporter}


# --- parse_input_shape ------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "shape"), [("3,32,32", (3, 32, 32)), ("3x8x8", (3, 8, 8)),
                                             (" (16,) ", (16,)), ("1, 28, 28", (1, 28, 28))])
def test_parse_input_shape(text, shape):
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["", "3,a,4", "3,0,4", "-3,4", "3.5,4"])
def test_parse_input_shape_rejects_bad_text(text):
    with pytest.raises(InputShapeError) as info:
        parse_input_shape(text)
    assert "--input-shape" in info.value.hint


# --- ONNX files --------------------------------------------------------------------------------

def test_onnx_file_and_model_object_give_the_same_layers(registry, tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(small_cnn(), path)
    from_file = load_model(path, registry=registry)
    from_object = load_model(small_cnn(), registry=registry)
    assert (from_file.name, from_file.format, from_file.framework) == ("net", "onnx", "onnx")
    assert from_file.source == str(path) and from_file.opset == 18
    assert [layer.name for layer in from_file.layers] == ["conv1", "conv2", "fc"]
    assert _hashes(from_file) == _hashes(from_object)
    assert from_object.name == "small_cnn"
    assert isinstance(from_file.proto, onnx.ModelProto)


def test_onnx_file_without_its_suffix_is_recognized_by_content(registry, tmp_path):
    path = tmp_path / "net.bin"
    onnx.save(small_cnn(), path)
    assert load_model(path, registry=registry).format == "onnx"


def test_unrecognized_file_names_the_format_option(registry, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a model\n")
    with pytest.raises(ModelLoadError, match="no importer recognizes") as info:
        load_model(path, registry=registry)
    assert "--format" in info.value.hint and "onnx" in info.value.hint and "torch" in info.value.hint


def test_unknown_format_lists_the_known_ones(registry, tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(small_cnn(), path)
    with pytest.raises(ModelLoadError, match="unknown model format 'keras'") as info:
        load_model(path, format="keras", registry=registry)
    assert "onnx, torch" in info.value.hint


def test_missing_file(registry, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope.onnx", registry=registry)


def test_truncated_onnx_file(registry, tmp_path):
    data = small_cnn().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="is not a valid ONNX model") as info:
        load_model(path, registry=registry)
    assert str(path) in info.value.message and info.value.hint


def test_text_file_named_onnx(registry, tmp_path):
    path = tmp_path / "fake.onnx"
    path.write_text("this is a text file, not a protobuf\n" * 5)
    with pytest.raises(ModelLoadError, match="is not a valid ONNX model"):
        load_model(path, registry=registry)


def test_dynamic_onnx_model_warns_about_input_shape(registry):
    loaded = load_model(small_cnn(batch="N", spatial=("H", "W")), registry=registry)
    assert any("--input-shape" in warning for warning in loaded.warnings)
    fixed = load_model(small_cnn(batch="N", spatial=("H", "W")), input_shape=SMALL_CNN_INPUT,
                       registry=registry)
    assert fixed.warnings == ()
    assert _hashes(fixed) == _hashes(load_model(small_cnn(), registry=registry))


def _save_external(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "net.onnx"
    onnx.save_model(small_cnn(), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    return path


def _set_locations(path: Path, location: str) -> None:
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, path)


def test_external_data_inside_the_folder_loads(registry, tmp_path):
    path = _save_external(tmp_path / "model")
    assert (tmp_path / "model" / "weights.bin").stat().st_size > 0
    loaded = load_model(path, registry=registry)
    assert _hashes(loaded) == _hashes(load_model(small_cnn(), registry=registry))


def test_external_data_in_a_subfolder_loads(registry, tmp_path):
    path = _save_external(tmp_path / "model")
    (tmp_path / "model" / "data").mkdir()
    os.replace(tmp_path / "model" / "weights.bin", tmp_path / "model" / "data" / "weights.bin")
    _set_locations(path, "data/../data/weights.bin")
    assert len(load_model(path, registry=registry).layers) == 3


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused(registry, tmp_path, how):
    path = _save_external(tmp_path / "model")
    outside = tmp_path / "x.bin"
    os.replace(tmp_path / "model" / "weights.bin", outside)  # a real file, readable if followed
    location = {"parent": "../x.bin", "absolute": str(outside), "symlink": "link.bin"}[how]
    if how == "symlink":
        (tmp_path / "model" / "link.bin").symlink_to(outside)
    _set_locations(path, location)
    with pytest.raises(ModelLoadError, match="points to external data") as info:
        load_model(path, registry=registry)
    assert "'w1'" in info.value.message  # names the tensor
    assert location in info.value.message


def test_missing_external_data_file(registry, tmp_path):
    path = _save_external(tmp_path / "model")
    (tmp_path / "model" / "weights.bin").unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(path, registry=registry)


# --- PyTorch --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch_net():
    import models

    return models.SmallTorchCNN().eval()


@pytest.fixture(scope="module")
def from_module(registry, torch_net):
    return load_model(torch_net, input_shape=SMALL_CNN_INPUT, registry=registry)


def test_module_layers_carry_the_module_weights(from_module, torch_net):
    assert (from_module.format, from_module.framework) == ("torch", "pytorch")
    assert from_module.name == "SmallTorchCNN"
    conv1, conv2, fc = from_module.layers
    np.testing.assert_array_equal(conv1.weight, torch_net.conv1.weight.detach().numpy())
    np.testing.assert_array_equal(conv2.weight, torch_net.conv2.weight.detach().numpy())
    np.testing.assert_array_equal(fc.weight, torch_net.fc.weight.detach().numpy())
    np.testing.assert_array_equal(fc.bias, torch_net.fc.bias.detach().numpy())
    assert conv2.strides == (2, 2) and conv2.groups == 2 and conv2.pads == (1, 1, 1, 1)
    assert conv1.input_shape == (3, 8, 8) and conv2.output_shape == (4, 4, 4)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_file_gives_the_module_layers(registry, from_module, torch_net, tmp_path):
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.trace(torch_net, torch.zeros(1, *SMALL_CNN_INPUT)), path)
    assert archive_kind(path) == "torchscript"
    loaded = load_model(path, input_shape=SMALL_CNN_INPUT, registry=registry)
    assert loaded.format == "torch" and _hashes(loaded) == _hashes(from_module)
    with pytest.raises(InputShapeError) as info:
        load_model(path, registry=registry)
    assert "--input-shape C,H,W" in info.value.hint


@pytest.mark.slow
def test_exported_program_gives_the_module_layers(registry, from_module, torch_net, tmp_path):
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(torch_net, (torch.zeros(1, *SMALL_CNN_INPUT),)), path)
    assert archive_kind(path) == "exported_program"
    loaded = load_model(path, registry=registry)  # the program fixes its own input shape
    assert _hashes(loaded) == _hashes(from_module)


def test_state_dict_with_model_class_gives_the_module_layers(registry, from_module, torch_net,
                                                             tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent(SMALL_TORCH_CNN_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "weights.pth"
    torch.save(torch_net.state_dict(), path)
    assert archive_kind(path) == "state_dict"
    loaded = load_model(path, input_shape=SMALL_CNN_INPUT, model_class="my_nets:SmallTorchCNN",
                        registry=registry)
    assert _hashes(loaded) == _hashes(from_module)
    # A checkpoint dict around the weights works too.
    torch.save({"epoch": 3, "state_dict": torch_net.state_dict()}, path)
    again = load_model(path, input_shape=SMALL_CNN_INPUT, model_class="my_nets:SmallTorchCNN",
                       registry=registry)
    assert _hashes(again) == _hashes(from_module)


def test_state_dict_that_does_not_fit_the_class(registry, torch_net, tmp_path, monkeypatch):
    (tmp_path / "my_nets2.py").write_text(textwrap.dedent(SMALL_TORCH_CNN_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    state = dict(torch_net.state_dict())
    state["conv1.weight"] = torch.zeros(5, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_model(path, input_shape=SMALL_CNN_INPUT, model_class="my_nets2:SmallTorchCNN",
                   registry=registry)


def test_state_dict_without_model_class_is_read_weights_only(registry, torch_net, tmp_path):
    path = tmp_path / "weights.pt"
    state = torch_net.state_dict()
    torch.save(state, path)
    loaded = load_model(path, registry=registry)
    assert loaded.proto is None  # no graph: every 2-D-or-more float weight is a matrix layer
    expected = [name for name, tensor in state.items()
                if tensor.is_floating_point() and tensor.ndim >= 2]
    assert [layer.name for layer in loaded.layers] == expected
    for layer in loaded.layers:  # conv kernels unfolded to (c_out, rest), as the filter SVD
        weight = state[layer.name].numpy()
        np.testing.assert_array_equal(layer.weight, weight.reshape(weight.shape[0], -1))


def test_pickled_module_is_refused_by_safe_loading(registry, torch_net, tmp_path, monkeypatch):
    (tmp_path / "my_nets3.py").write_text(textwrap.dedent(SMALL_TORCH_CNN_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_nets3

    path = tmp_path / "whole.pt"
    torch.save(my_nets3.SmallTorchCNN(), path)
    with pytest.raises(ModelLoadError, match="weights_only") as info:
        load_model(path, input_shape=SMALL_CNN_INPUT, model_class="my_nets3:SmallTorchCNN",
                   registry=registry)
    assert "state_dict" in info.value.hint


def test_bad_model_class_spec(registry, torch_net, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(torch_net.state_dict(), path)
    with pytest.raises(ModelLoadError, match=r"package\.module:Class"):
        load_model(path, input_shape=SMALL_CNN_INPUT, model_class="no_colon", registry=registry)
    with pytest.raises(ModelLoadError, match="cannot import module"):
        load_model(path, input_shape=SMALL_CNN_INPUT, model_class="no_such_mod_xyz:Net",
                   registry=registry)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torch_file_without_suffix_is_recognized_by_content(registry, torch_net, from_module,
                                                            tmp_path):
    path = tmp_path / "net.model"
    torch.jit.save(torch.jit.trace(torch_net, torch.zeros(1, *SMALL_CNN_INPUT)), path)
    loaded = load_model(path, input_shape=SMALL_CNN_INPUT, registry=registry)
    assert loaded.format == "torch" and _hashes(loaded) == _hashes(from_module)


def test_module_without_input_shape(registry, torch_net):
    with pytest.raises(InputShapeError) as info:
        load_model(torch_net, registry=registry)
    assert "--input-shape" in info.value.hint


def test_fully_connected_module_takes_a_features_shape(registry):
    net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    net.train()
    loaded = load_model(net, input_shape=(6,), registry=registry)
    assert net.training  # exported in eval mode, handed back as it came
    assert [layer.input_shape for layer in loaded.layers] == [(6,), (4,)]
    np.testing.assert_array_equal(loaded.layers[0].weight, net[0].weight.detach().numpy())


def test_torch_missing_gives_the_install_command(registry, tmp_path, monkeypatch):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"PK\x03\x04" + bytes(seeded((8,)).tobytes()))
    monkeypatch.setitem(sys.modules, "torch", None)  # what find_spec and import see without torch
    assert not TorchImporter.available()
    with pytest.raises(MissingExtraError) as info:
        load_model(path, registry=registry)
    assert "pip install 'specprof[torch]'" in info.value.one_line()
    with pytest.raises(MissingExtraError):
        TorchImporter().load(path, ImportOptions(input_shape=SMALL_CNN_INPUT))
