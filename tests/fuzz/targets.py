"""What the fuzzer feeds specprof, and how an outcome is classified.

Each target takes bytes or text an attacker controls and drives one public entry point:
``load_model`` (an ONNX file), ``Store.import_run`` (an export document) and ``Store.query``
(``--where``/``--sort``/globs). An outcome is ``ok`` (accepted), ``clean`` (a ``SpecprofError``:
one line naming the problem) or ``traceback`` (any other exception: a bug).
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from specprof.engine.errors import SpecprofError
from specprof.testing import small_onnx_model

OUTCOMES = ("ok", "clean", "traceback")


def classify(action: Callable[[], Any]) -> tuple[str, str]:
    """(outcome, detail) of running ``action``."""
    try:
        action()
    except SpecprofError as error:
        return "clean", error.one_line()
    except Exception as error:  # the fuzzer's job: report it, never hide it
        return "traceback", f"{type(error).__name__}: {error}"[:300]
    return "ok", ""


def mutate_model(seed: int) -> bytes:
    """A hostile ONNX file: the small model with structural damage, then maybe byte damage."""
    rng = random.Random(seed)
    model = small_onnx_model(seed)
    conv, gemm = model.graph.node[0], model.graph.node[3]
    choice = rng.randrange(10)
    ints = [0, -1, 1, 2, 3, 7, 2**31 - 1, 2**40]
    if choice == 0:
        del conv.attribute[:]
        conv.attribute.extend([onnx.helper.make_attribute(
            rng.choice(["strides", "dilations", "pads", "kernel_shape"]),
            [rng.choice(ints) for _ in range(rng.choice([1, 2, 4]))])])
    elif choice == 1:
        conv.attribute.extend([onnx.helper.make_attribute("group", rng.choice(ints))])
    elif choice == 2:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[rng.randrange(len(dims))].dim_value = rng.choice(ints)
    elif choice == 3:
        model.opset_import[0].version = rng.choice([1, 5, 7, 99, 10**6])
    elif choice == 4:
        weight = model.graph.initializer[rng.randrange(2)]
        weight.data_type = rng.choice([onnx.TensorProto.STRING, onnx.TensorProto.COMPLEX64,
                                       onnx.TensorProto.INT8, onnx.TensorProto.BOOL,
                                       onnx.TensorProto.FLOAT16])
    elif choice == 5:
        weight = model.graph.initializer[rng.randrange(2)]
        weight.dims[rng.randrange(len(weight.dims))] = rng.choice(ints)
    elif choice == 6:
        gemm.attribute.extend([onnx.helper.make_attribute("transB", rng.choice(ints))])
    elif choice == 7:
        weight = model.graph.initializer[0]
        weight.data_location = onnx.TensorProto.EXTERNAL
        entry = weight.external_data.add()
        entry.key, entry.value = "location", rng.choice(
            ["../../etc/passwd", "/etc/passwd", "missing.bin", "", "a\x00b"])
        for key in ("offset", "length"):
            item = weight.external_data.add()
            item.key, item.value = key, str(rng.choice([-5, 0, 10**20])) + rng.choice(["", ".5"])
    elif choice == 8:
        model.graph.node.extend([onnx.helper.make_node(
            rng.choice(["Conv", "MatMul", "Gemm", "Unknown"]), ["y", "g"], ["z"],
            domain=rng.choice(["", "custom"]))])
    data = bytearray(model.SerializeToString())
    if choice == 9 or rng.random() < 0.3:
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    if rng.random() < 0.1:
        data = data[: rng.randrange(len(data))]
    return bytes(data)


def load_onnx(folder: Path, seed: int) -> tuple[str, str]:
    from specprof.engine.loading import load_model

    path = folder / f"fuzz{seed}.onnx"
    path.write_bytes(mutate_model(seed))
    return classify(lambda: load_model(path))


def _mutate_json(value: Any, rng: random.Random, depth: int = 0) -> Any:
    hostile = [None, True, -1, 2**70, 1.5, "", "x" * 5, "ÿ\udcff"[0], [], {}, "2024-13-45",
               "not base64!", [[[[[]]]]]]
    if isinstance(value, dict) and value and rng.random() < 0.7:
        key = rng.choice(list(value))
        action = rng.randrange(3)
        if action == 0:
            del value[key]
        elif action == 1:
            value[key] = rng.choice(hostile)
        else:
            value[key] = _mutate_json(value[key], rng, depth + 1)
    elif isinstance(value, list) and value and rng.random() < 0.7:
        index = rng.randrange(len(value))
        value[index] = _mutate_json(value[index], rng, depth + 1) if rng.random() < 0.6 \
            else rng.choice(hostile)
        if rng.random() < 0.2:
            value.append(copy.deepcopy(value[index]))  # a duplicate row
    else:
        return rng.choice(hostile)
    return value


def import_export(store: Any, document: dict[str, Any], seed: int) -> tuple[str, str]:
    rng = random.Random(seed)
    hostile = _mutate_json(copy.deepcopy(document), rng)
    for _ in range(rng.randrange(3)):
        hostile = _mutate_json(hostile, rng)
    text = json.dumps(hostile) if isinstance(hostile, dict) else "[]"
    return classify(lambda: store.import_run(json.loads(text)))


def query(store: Any, seed: int) -> tuple[str, str]:
    rng = random.Random(seed)
    pieces = ["sigma_max", "stable_rank", "layer", "1", "'x'", ">", "<=", "=", "and", "or",
              ";", "--", "DROP TABLE runs", "1e999", "nan", "(", ")", "role", "block", "'",
              "\x00", "%", "*", "_"]
    where = " ".join(rng.choice(pieces) for _ in range(rng.randrange(1, 7)))
    sort = rng.choice(["", "-", "sigma_max", "-layer", "nope", "1; DROP", "--sigma_max"])
    model = rng.choice([None, "*", "%", "_", "[", "a'b", "\x00"])
    return classify(lambda: store.query(where=where, sort=sort or None, model=model,
                                        limit=rng.choice([None, 1, 2**63, 2**70])))


def checkpoint_bases() -> dict[str, bytes]:
    """Valid small checkpoints to damage: a safetensors file and a GGUF file."""
    import struct
    import tempfile

    import numpy as np

    weights = np.arange(24, dtype=np.float32).reshape(6, 4)
    header = {"__metadata__": {"format": "pt"},
              "model.layers.0.mlp.up_proj.weight": {"dtype": "F32", "shape": [6, 4],
                                                    "data_offsets": [0, 96]},
              "model.norm.weight": {"dtype": "F32", "shape": [4], "data_offsets": [96, 112]}}
    text = json.dumps(header).encode()
    safetensors = (struct.pack("<Q", len(text)) + text + weights.tobytes()
                   + np.ones(4, np.float32).tobytes())
    import gguf

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "base.gguf")
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_tensor("blk.0.ffn_up.weight", weights)
        writer.add_tensor("blk.0.ffn_down.weight", weights.T.copy().astype(np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return {"safetensors": safetensors, "gguf": path.read_bytes()}


def _lying_safetensors(data: bytes, rng: random.Random) -> bytes:
    """The header's sizes, offsets, shapes or dtypes replaced by lies."""
    import struct

    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    name = rng.choice([key for key in header if key != "__metadata__"])
    entry = header[name]
    lies: list[Any] = [-1, 0, 1, 2**31, 2**63, 2**64 + 1, 10**30, 1.5, "8", None, [], [1, 2]]
    field = rng.choice(["shape", "data_offsets", "dtype", "length", "entry", "metadata"])
    if field == "shape":
        entry["shape"] = [rng.choice(lies) if rng.random() < 0.5 else rng.choice([6, 4, 0])
                          for _ in range(rng.randrange(0, 4))]
    elif field == "data_offsets":
        entry["data_offsets"] = [rng.choice([*lies, 0, 96, 112, 200]) for _ in range(2)]
    elif field == "dtype":
        entry["dtype"] = rng.choice(["F8_E4M3", "BF16", "I64", "COMPLEX", "", 7, None, "f32"])
    elif field == "entry":
        header[name] = rng.choice(lies)
    elif field == "metadata":
        header["__metadata__"] = rng.choice([*lies, {"a": [1] * 3}])
    text = json.dumps(header).encode()
    prefix = struct.pack("<Q", len(text))
    if field == "length":
        prefix = struct.pack("<Q", rng.choice([0, 1, len(text) - 1, len(text) + 7, 2**40,
                                               2**64 - 1]))
    return prefix + text + data[8 + length:]


def _lying_gguf(data: bytes, rng: random.Random) -> bytes:
    """The header's counts, or a tensor's dimensions, type or offset, replaced by lies."""
    import struct

    out = bytearray(data)
    field = rng.choice(["version", "tensors", "entries", "tensor info"])
    if field == "version":
        out[4:8] = struct.pack("<I", rng.choice([0, 1, 4, 2**32 - 1]))
    elif field in ("tensors", "entries"):
        at = 8 if field == "tensors" else 16
        out[at:at + 8] = struct.pack("<Q", rng.choice([0, 3, 1000, 2**32, 2**63, 2**64 - 1]))
    else:
        at = out.find(b"blk.0.ffn_up.weight") + len(b"blk.0.ffn_up.weight")
        # n_dims (u32), dims (u64 each), type (u32), offset (u64)
        spot = rng.choice([at, at + 4, at + 12, at + 20, at + 24])
        width = 4 if spot in (at, at + 20) else 8
        value = rng.choice([0, 1, 7, 2**20, 2**31 - 1, 2**32 - 1])
        if width == 8:
            value = rng.choice([value, 2**40, 2**63, 2**64 - 1])
        out[spot:spot + width] = value.to_bytes(width, "little")
    return bytes(out)


def mutate_checkpoint(bases: dict[str, bytes], seed: int) -> tuple[str, bytes]:
    """(suffix, bytes) of a hostile checkpoint: a header that lies, then maybe byte damage."""
    rng = random.Random(seed)
    kind = rng.choice(sorted(bases))
    data = bytearray(_lying_safetensors(bases[kind], rng) if kind == "safetensors"
                     else _lying_gguf(bases[kind], rng))
    if rng.random() < 0.3:
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    if rng.random() < 0.15:
        data = data[: rng.randrange(len(data))]
    return kind, bytes(data)


def load_checkpoint(folder: Path, bases: dict[str, bytes], seed: int) -> tuple[str, str]:
    """Load a hostile checkpoint and read every layer's weights."""
    from specprof.engine.loading import load_model

    kind, data = mutate_checkpoint(bases, seed)
    path = folder / f"fuzz{seed}.{kind}"
    path.write_bytes(data)
    return classify(lambda: [layer.weight.sum() for layer in load_model(path).layers])
