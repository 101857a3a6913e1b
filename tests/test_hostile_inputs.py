"""Hostile models and names: invalid attributes, non-real weights and unknown opsets end in one
line naming the problem; names with markup or terminal escapes never break or steer a command."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
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


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(zipfile.ZipInfo(name), content)
    return path


def _declare_size(path: Path, size: int) -> Path:
    """Patch the central directory so that every member declares ``size`` bytes (a bomb that
    costs nothing to build)."""
    data = bytearray(path.read_bytes())
    start = 0
    while (start := data.find(b"PK\x01\x02", start)) >= 0:
        data[start + 24:start + 28] = size.to_bytes(4, "little")
        start += 4
    path.write_bytes(bytes(data))
    return path


_TORCH = {"archive/data.pkl": b"\x80\x02}q\x00.", "archive/version": b"3\n"}
_TORCHSCRIPT = {"m/constants.pkl": b"\x80\x02).", "m/code/m.py": b"", "m/data.pkl": b"."}
_EXPORTED = {"p/archive_format": b"pt2", "p/models/model.json": b"{}"}


@pytest.mark.parametrize(("suffix", "members", "message"), [
    (".pt", {**_TORCH, "archive/../../evil.py": b"x"}, "climbs out of the archive"),
    (".pt", {**_TORCH, "/etc/evil": b"x"}, "an absolute path"),
    (".pth", {**_TORCH, "other/data.pkl": b"x"}, "which a PyTorch archive never has"),
    (".ts", {**_TORCHSCRIPT, "m/..\\..\\evil": b"x"}, "a backslash"),
    (".pt2", {**_EXPORTED, "p/../evil.json": b"x"}, "climbs out of the archive"),
    (".pt2", {**_EXPORTED, "p/data/weights": b"\x00" * 4000}, "zip bomb"),
    (".keras", {"config.json": b"{}", "model.weights.h5": b"", "../evil.py": b"x"},
     "climbs out of the archive"),
    (".keras", {"config.json": b"{}", "model.weights.h5": b"", "custom_code.py": b"x"},
     "which a Keras archive never has"),
    (".keras", {"config.json": b"{}", "model.weights.h5": b"\x00" * 4000}, "zip bomb"),
])
def test_hostile_zip_archives_are_refused_before_any_loader(
        tmp_path: Path, suffix: str, members: dict[str, bytes], message: str) -> None:
    """Traversal names, foreign members and bombs in torch and Keras zips: one line, from the
    central directory alone (a loader that trusts the archive never sees it)."""
    path = _zip(tmp_path / f"model{suffix}", members)
    if message == "zip bomb":
        _declare_size(path, 2**32 - 1)
    with pytest.raises(ModelLoadError) as caught:
        load_model(path, input_shape="1,4,4")
    assert message in caught.value.one_line()
    assert "\n" not in caught.value.one_line()


def test_archive_member_count_and_duplicates_are_limited(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    from specprof.engine import archives

    path = _zip(tmp_path / "model.pt", _TORCH)
    assert archives.check_zip(path, "PyTorch archive").names == tuple(_TORCH)
    monkeypatch.setattr(archives, "MAX_MEMBERS", 1)
    with pytest.raises(ModelLoadError, match="has 2 members, more than any PyTorch archive"):
        archives.check_zip(path, "PyTorch archive")
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it writes
        twice = _zip(tmp_path / "twice.pt", _TORCH)
        import zipfile

        with zipfile.ZipFile(twice, "a") as archive:
            archive.writestr("archive/version", b"4\n")
    with pytest.raises(ModelLoadError, match="twice"):
        archives.check_zip(twice, "PyTorch archive")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(ModelLoadError, match="not a readable PyTorch archive"):
        archives.check_zip(truncated, "PyTorch archive")


def test_third_party_logs_are_hidden_unless_verbose(tmp_path: Path) -> None:
    """A library's log line or Python warning never reaches the user's stderr by default;
    ``specprof --verbose`` shows them (run in a child: logging is process state)."""
    script = (
        "import logging, sys, warnings\n"
        "from specprof.engine.logs import route_third_party_logs\n"
        "route_third_party_logs(sys.argv[1] == 'verbose')\n"
        "for name in ('tensorflow', 'absl', 'onnxruntime', 'jax'):\n"
        "    logging.getLogger(name).warning('noise from %s', name)\n"
        "warnings.warn('a library warning')\n"
    )
    quiet = subprocess.run([sys.executable, "-c", script, "quiet"], capture_output=True,
                           text=True, check=True)
    assert quiet.stderr == ""
    loud = subprocess.run([sys.executable, "-c", script, "verbose"], capture_output=True,
                          text=True, check=True)
    for name in ("tensorflow", "absl", "onnxruntime", "jax"):
        assert f"noise from {name}" in loud.stderr
    assert "a library warning" in loud.stderr


def test_a_random_keras_file_is_one_line_on_stderr(tmp_path: Path) -> None:
    path = tmp_path / "random.keras"
    path.write_bytes(np.random.default_rng(0).bytes(3000))
    result = _specprof("layers", str(path), home=tmp_path)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_an_export_with_a_duplicated_result_is_refused_and_changes_nothing(
        tmp_path: Path) -> None:
    import copy

    from specprof.engine.plugins import get_registry
    from specprof.engine.profile import ProfileConfig, profile_model
    from specprof.engine.store import Store
    from specprof.testing import small_onnx_model

    onnx.save(small_onnx_model(), tmp_path / "small.onnx")
    with Store.open(str(tmp_path / "x.db")) as store:
        run = profile_model(load_model(tmp_path / "small.onnx"),
                            ProfileConfig(backends=("exact",)), store, get_registry()).run_id
        document = store.export_run(run)
        forged = copy.deepcopy(document)
        forged["results"].append(copy.deepcopy(forged["results"][0]))
        before = store.counts()
        with pytest.raises(SpecprofError) as caught:
            store.import_run(forged)
        assert "a second result of layer" in caught.value.one_line()
        assert store.counts() == before
        assert store.import_run(document) != run  # the genuine document still imports


@pytest.mark.parametrize("alpha", [math.nan, math.inf])
def test_gemm_with_a_non_finite_alpha_is_one_error(tmp_path: Path, alpha: float) -> None:
    weight = numpy_helper.from_array(np.ones((4, 3), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], alpha=alpha)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [weight])
    path = tmp_path / "gemm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NumPy RuntimeWarning on the way
        with pytest.raises(ModelLoadError, match="must be finite"):
            load_model(path)
