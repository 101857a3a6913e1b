"""Resource limits before work: each backend's memory estimate bounds what it really allocates,
and a layer over the memory or time limit is refused up front with the number and a way out,
never computed until the operating system kills the process."""

from __future__ import annotations

import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from specprof.engine.errors import SpecprofError
from specprof.engine.limits import available_memory, format_bytes, limit_refusal, parse_memory
from specprof.engine.plugins import get_registry
from specprof.engine.profile import ProfileConfig, choose_backend
from specprof.engine.types import Layer, Request

MIB = 2**20


def _conv_model(size: int, c_in: int = 3, c_out: int = 8) -> onnx.ModelProto:
    """One 'same' 3x3 conv declared on a size x size input."""
    weight = np.random.default_rng(0).standard_normal((c_out, c_in, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_out, size, size])],
        initializer=[numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _specprof(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "specprof", *args], capture_output=True,
                          text=True, check=False, env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
                          timeout=120)


@pytest.mark.parametrize(("text", "size"), [
    ("8G", 8 * 2**30), ("512M", 512 * MIB), ("1.5GiB", int(1.5 * 2**30)), ("100", 100),
    ("2kb", 2048), (" 3 T ", 3 * 2**40),
])
def test_memory_sizes_are_read_in_units_of_1024(text: str, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "8X", "1e30G", "nan"])
def test_a_bad_memory_size_is_one_clear_error(text: str) -> None:
    with pytest.raises(SpecprofError) as caught:
        parse_memory(text)
    assert "--max-memory" in caught.value.one_line()


def test_available_memory_reads_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  64 kB\nMemAvailable:   1234 kB\n")
    assert available_memory(meminfo) == 1234 * 1024
    assert format_bytes(5.5 * 2**30) == "5.5 GiB"


def _zoo() -> list[Layer]:
    rng = np.random.default_rng(1)
    return [
        Layer("rgb", "Conv", rng.standard_normal((8, 3, 3, 3)), pads=(1, 1, 1, 1),
              input_shape=(3, 48, 48)),
        Layer("wide", "Conv", rng.standard_normal((32, 32, 3, 3)), pads=(1, 1, 1, 1),
              input_shape=(32, 6, 6)),
        Layer("strided", "Conv", rng.standard_normal((32, 8, 3, 3)), strides=(2, 2),
              pads=(1, 1, 1, 1), groups=2, input_shape=(16, 8, 8)),
        Layer("up", "ConvTranspose", rng.standard_normal((16, 8, 4, 4)), strides=(2, 2),
              pads=(1, 1, 1, 1), input_shape=(16, 6, 6)),
        Layer("fc", "Gemm", rng.standard_normal((400, 300)), input_shape=(300,)),
    ]


@pytest.mark.parametrize("request_", [Request(), Request(top_k=3), Request(boundary="circular"),
                                      Request(precision="float32")],
                         ids=["all", "top3", "circular", "float32"])
def test_each_backend_allocates_no_more_than_it_estimates(request_: Request) -> None:
    """tracemalloc sees every NumPy allocation: the estimate must cover the measured peak
    (up to 1 MiB of fixed overhead: thread pools, LAPACK's small work arrays) and stay within
    a small factor of it, so that layers that fit are not refused."""
    backends = get_registry().available_backends()
    warm = Layer("warm", "Conv", np.ones((2, 2, 3, 3)), pads=(1, 1, 1, 1), input_shape=(2, 4, 4))
    for backend in backends.values():  # imports and first-call caches are not counted
        if backend.supports(warm, request_):
            backend.compute(warm, request_)
    for layer in _zoo():
        for name, backend in backends.items():
            if not backend.supports(layer, request_):
                continue
            estimate = backend.memory(layer, request_)
            assert estimate is not None, name
            tracemalloc.start()
            try:
                backend.compute(layer, request_)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak <= estimate + MIB, (layer.name, name, peak, estimate)
            assert estimate <= 16 * peak + 16 * MIB, (layer.name, name, peak, estimate)


def test_a_big_input_is_refused_before_any_work() -> None:
    """The issue's case: a 3->8 conv declared on a 4096 x 4096 input ran past 300 s and 5.5 GB.
    Now every backend is refused at planning time with its estimate and a way out."""
    layer = Layer("conv", "Conv", np.random.default_rng(0).standard_normal((8, 3, 3, 3)),
                  pads=(1, 1, 1, 1), input_shape=(3, 4096, 4096))
    registry = get_registry()
    request = ProfileConfig(max_memory=8 * 2**30).request(layer)
    started = time.perf_counter()
    backend, reason = choose_backend(layer, request, "auto", registry)
    assert time.perf_counter() - started < 5
    assert backend is None
    assert "toeplitz would need ~" in reason and "above the 8.0 GiB limit" in reason
    assert "--max-memory" in reason and "--top-k K" in reason
    toeplitz = registry.backend("toeplitz")
    assert "--max-seconds" in limit_refusal(toeplitz, layer, Request(max_seconds=60.0))


def test_the_time_budget_applies_to_approximate_backends_only() -> None:
    layer = _zoo()[0]
    registry = get_registry()
    request = Request(max_seconds=1e-9)
    refusal = limit_refusal(registry.backend("toeplitz"), layer, request)
    assert "budget of an approximate backend" in refusal and "--max-seconds" in refusal
    assert limit_refusal(registry.backend("exact"), layer, request) == ""
    assert limit_refusal(registry.backend("toeplitz"), layer, Request(max_seconds=None)) == ""


def test_max_memory_moves_auto_to_a_backend_that_fits() -> None:
    """Exact top-k fits 'wide' only with enough memory; below it, auto says why it refused."""
    layer = _zoo()[1]
    registry = get_registry()
    chosen, _ = choose_backend(layer, Request(top_k=3, max_memory=2**30, prefer=("exact",)),
                               "auto", registry)
    assert chosen is not None and chosen.name == "exact"
    chosen, reason = choose_backend(layer, Request(top_k=3, max_memory=1000), "auto", registry)
    assert chosen is None and "above the 1000 B limit" in reason
    chosen, reason = choose_backend(layer, Request(max_memory=1000), "exact", registry)
    assert chosen is None and "exact would need ~" in reason


def test_absurd_declared_shapes_never_allocate(tmp_path: Path) -> None:
    """A conv declared on a 10^9 x 10^9 input: planning is arithmetic, nothing is allocated,
    the layer is stored as skipped with the reason and the command goes on (exit 0)."""
    from specprof.engine import api

    path = tmp_path / "absurd.onnx"
    onnx.save(_conv_model(10**9), path)
    tracemalloc.start()
    try:
        frame = api.profile(path, db=f"sqlite:///{tmp_path / 'x.db'}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * MIB
    assert list(frame["status"]) == ["skipped"]
    assert "of memory, above the" in frame["reason"].iloc[0]


def test_the_cli_refuses_the_big_layer_in_seconds_with_one_reason(tmp_path: Path) -> None:
    path = tmp_path / "big.onnx"
    onnx.save(_conv_model(4096), path)
    db = f"sqlite:///{tmp_path / 'x.db'}"
    started = time.perf_counter()
    result = _specprof("profile", str(path), "--db", db, "--max-memory", "4G", "--output-format",
                       "json", home=tmp_path)
    assert time.perf_counter() - started < 60  # was > 300 s before the limits
    assert result.returncode == 0, result.stderr
    assert '"status":"skipped"' in result.stdout.replace(" ", "")
    assert "above the 4.0 GiB limit" in result.stdout
    bad = _specprof("profile", str(path), "--db", db, "--max-memory", "lots", home=tmp_path)
    assert bad.returncode != 0
    assert len(bad.stderr.strip().splitlines()) == 1 and "--max-memory" in bad.stderr
