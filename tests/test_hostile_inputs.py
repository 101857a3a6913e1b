"""Hostile models and names: invalid attributes, non-real weights and unknown opsets end in one
line naming the problem; names with markup or terminal escapes never break or steer a command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from specprof.engine.errors import ModelLoadError, SpecprofError, printable
from specprof.engine.loading import load_model


def _conv_model(weight: np.ndarray | None = None, opset: int = 18, name: str = "conv",
                **attributes: Any) -> onnx.ModelProto:
    weight = np.ones((4, 2, 3, 3), np.float32) if weight is None else weight
    tensor = numpy_helper.from_array(weight, "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name=name, **attributes)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 2, 8, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 4, "h", "w"])], initializer=[tensor])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _specprof(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "specprof", *args], capture_output=True,
                          text=True, check=False, env={"PATH": "/usr/bin:/bin", "HOME": str(home)})


@pytest.mark.parametrize(("attributes", "message"), [
    ({"strides": [0, 1]}, "strides [0, 1] must be 2 positive integers"),
    ({"dilations": [0, 0]}, "dilations [0, 0] must be 2 positive integers"),
    ({"group": 0}, "group 0 must be a positive divisor"),
    ({"group": 3}, "group 3 must be a positive divisor"),
    ({"kernel_shape": [5, 5]}, "kernel_shape [5, 5] contradicts the weight's [3, 3]"),
])
def test_invalid_conv_attributes_are_one_clear_error(tmp_path: Path, attributes: dict[str, Any],
                                                     message: str) -> None:
    path = tmp_path / "bad.onnx"
    onnx.save(_conv_model(**attributes), path)
    with pytest.raises(SpecprofError) as caught:
        load_model(path)
    assert message in caught.value.one_line()
    result = _specprof("profile", str(path), "--db", str(tmp_path / "x.db"), home=tmp_path)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_complex_weights_are_refused_not_truncated(tmp_path: Path) -> None:
    path = tmp_path / "complex.onnx"
    model = _conv_model(np.ones((4, 2, 3, 3), np.complex64))
    onnx.save(model, path)
    with pytest.raises(ModelLoadError, match="dtype complex64: a linear layer needs real numbers"):
        load_model(path)


def test_an_opset_newer_than_onnx_knows_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.onnx"
    onnx.save(_conv_model(opset=99), path)
    with pytest.raises(ModelLoadError, match="opset 99, newer than"):
        load_model(path)


def test_printable_shows_control_characters_instead_of_acting_on_them() -> None:
    assert printable("a\x1b[31mb\x07c\x9b") == "a\\x1b[31mb\\x07c\\x9b"
    assert printable("tab\tand\nnewline stay") == "tab\tand\nnewline stay"
    assert SpecprofError("bad \x1b]0;title\x07", "fix").one_line() == "bad \\x1b]0;title\\x07; fix"


@pytest.mark.parametrize("name", ["[/]", "[bold]x[/bold]", "evil\x1b]0;pwned\x07\x1b[2J"])
def test_a_hostile_layer_name_never_breaks_a_command(tmp_path: Path, name: str) -> None:
    from click.testing import CliRunner

    from specprof.engine.cli import build_cli

    path = tmp_path / "named.onnx"
    onnx.save(_conv_model(name=name, pads=[1, 1, 1, 1]), path)
    db = str(tmp_path / "runs.db")
    runner = CliRunner()
    for args in (("profile", str(path), "--db", db), ("layers", str(path)),
                 ("query", "--db", db), ("analyze", "--run", "1", "--db", db)):
        result = runner.invoke(build_cli(), list(args))
        assert result.exit_code == 0, (args, result.output)
        assert "\x1b" not in result.output, args  # shown as the text \x1b, never sent raw
    rows = json.loads(runner.invoke(build_cli(), ["query", "--db", db, "--format", "json"]).stdout)
    assert rows[0]["layer"] == name  # JSON keeps the name exactly (escaped by JSON itself)


def _broken_data(tmp_path: Path) -> dict[str, Path]:
    """Labelled-data files of ten broken kinds, for a model taking 1 x 8 x 8 inputs."""
    x, y = np.zeros((4, 1, 8, 8), np.float32), np.arange(4)
    files: dict[str, Path] = {}

    def npz(name: str, **arrays: Any) -> None:
        files[name] = tmp_path / f"{name}.npz"
        np.savez(files[name], **arrays)

    npz("object-labels", x=x, y=np.array([{"a": 1}] * 4, dtype=object))
    npz("text-inputs", x=np.array([["a"] * 64] * 4).reshape(4, 1, 8, 8), y=y)
    npz("no-labels", x=x)
    npz("float-text-labels", x=x, y=np.array(["1", "2", "3", "4"]))
    good = tmp_path / "good.npz"
    np.savez(good, x=x, y=y)
    data = good.read_bytes()
    files["truncated"] = tmp_path / "truncated.npz"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["random"] = tmp_path / "random.npz"
    files["random"].write_bytes(np.random.default_rng(0).bytes(2000))
    files["empty"] = tmp_path / "empty.npz"
    files["empty"].write_bytes(b"")
    for name, content in (("not-an-image", b"GIF89a\x00garbage"), ("empty-image", b"")):
        folder = tmp_path / name / "cat"
        folder.mkdir(parents=True)
        (folder / "a.png").write_bytes(content)
        files[name] = tmp_path / name
    from PIL import Image

    big = tmp_path / "huge-image" / "cat"
    big.mkdir(parents=True)
    Image.new("L", (4000, 4000)).save(big / "a.png")  # a few KB, 16 M pixels
    files["huge-image"] = tmp_path / "huge-image"
    return files


def test_broken_labelled_data_is_one_clear_error(tmp_path: Path) -> None:
    from specprof.plugins.analyzers.datasets import open_data

    for name, path in _broken_data(tmp_path).items():
        with pytest.raises(SpecprofError) as caught:
            source = open_data(path, (1, 8, 8), batch_size=2)
            for _ in source.batches:
                pass
        assert "\n" not in caught.value.one_line(), name


@pytest.mark.parametrize(("url", "message"), [
    ("postgresql:/x", "neither a file path nor a database URL"),
    ("sqlite:/x.db", "neither a file path nor a database URL"),
    ("sqlite://", "in-memory SQLite database"),
    ("sqlite:///:memory:", "in-memory SQLite database"),
])
def test_database_url_typos_and_memory_databases_are_refused(
        tmp_path: Path, url: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from specprof.engine.store import Store

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPECPROF_ALLOW_MEMORY_DB", raising=False)
    with pytest.raises(SpecprofError, match=message):
        Store.open(url)
    assert list(tmp_path.iterdir()) == []  # no stray relative SQLite file created


def test_a_memory_database_when_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    from specprof.engine.store import Store

    monkeypatch.setenv("SPECPROF_ALLOW_MEMORY_DB", "1")
    with Store.open("sqlite://") as store:
        assert store.counts()["runs"] == 0


def test_a_fifo_a_device_or_a_directory_is_refused_without_blocking(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    for path, message in ((fifo, "not a regular file"), (Path("/dev/zero"), "not a regular file"),
                          (folder, "is a directory")):
        with pytest.raises(ModelLoadError, match=message):
            load_model(path)
