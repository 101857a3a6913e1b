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
