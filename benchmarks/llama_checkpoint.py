"""A Llama-shaped, sharded, bfloat16 safetensors checkpoint: specprof against the LAPACK floor.

Writes a checkpoint (GQA attention, gated MLP, untied embedding and head, norms), then

1. times ``load_model`` + ``profile`` (all singular values of every matrix, float32, stored
   into a fresh SQLite database) in a child process, and reads the child's peak RSS;
2. times the floor: ``numpy.linalg.svd(compute_uv=False)`` in float32 over the same matrices,
   already in memory, one after the other.

The default is small (runs in well under a minute); the issue's ~0.5B case (8 blocks; 22
blocks is TinyLlama's 1.1B) is

    python benchmarks/llama_checkpoint.py --hidden 2048 --intermediate 5632 --kv 256 \\
        --vocab 32000 --blocks 8

No torch needed: the shards are written by hand (bf16 = the top 16 bits of a float32).
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def llama_shapes(hidden: int, intermediate: int, kv: int, vocab: int,
                 blocks: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for b in range(blocks):
        p = f"model.layers.{b}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden),
                   p + "self_attn.k_proj.weight": (kv, hidden),
                   p + "self_attn.v_proj.weight": (kv, hidden),
                   p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (intermediate, hidden),
                   p + "mlp.up_proj.weight": (intermediate, hidden),
                   p + "mlp.down_proj.weight": (hidden, intermediate),
                   p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    return shapes


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even)."""
    bits = values.astype(np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype("<u2")


def write_shard(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {}, 0
    for name, bits in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(bits.shape),
                        "data_offsets": [offset, offset + bits.nbytes]}
        offset += bits.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for bits in tensors.values():
            handle.write(bits.tobytes())


def write_checkpoint(folder: Path, shapes: dict[str, tuple[int, ...]], shard_bytes: int,
                     seed: int = 0) -> int:
    """Shards of at most ~shard_bytes with an index; returns the parameter count."""
    rng = np.random.default_rng(seed)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, shape in shapes.items():
        values = (rng.standard_normal(shape, dtype=np.float32) * 0.02 if len(shape) > 1
                  else np.ones(shape, dtype=np.float32))
        bits = bf16_bits(values)
        if size and size + bits.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = bits
        size += bits.nbytes
    weight_map = {}
    for number, tensors in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        write_shard(folder / file, tensors)
        weight_map |= dict.fromkeys(tensors, file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sum(int(np.prod(shape)) for shape in shapes.values())


_CHILD = """
import sys, time
from specprof.engine import api
start = time.perf_counter()
frame = api.profile(sys.argv[1], db=sys.argv[2], precision="float32")
seconds = time.perf_counter() - start
assert (frame["status"] == "ok").all(), frame[frame["status"] != "ok"]
# VmHWM: this process's own peak. ru_maxrss would not do: Linux carries the parent's peak
# (it wrote the checkpoint) into the child's at exec.
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(seconds, len(frame), peak)
"""


def floor_seconds(folder: Path) -> float:
    """numpy's float32 values-only SVD over the same matrices (read outside the timing)."""
    from specprof.engine.tensor_files import read_safetensor, safetensors_header, shard_files

    total = 0.0
    for shard in shard_files(folder):
        header, _ = safetensors_header(shard)
        for name, entry in header.items():
            if len(entry["shape"]) < 2:
                continue
            matrix = np.ascontiguousarray(read_safetensor(shard, name))
            start = time.perf_counter()
            np.linalg.svd(matrix, compute_uv=False)
            total += time.perf_counter() - start
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--kv", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--shard-mb", type=int, default=16)
    args = parser.parse_args()
    shapes = llama_shapes(args.hidden, args.intermediate, args.kv, args.vocab, args.blocks)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        folder.mkdir()
        params = write_checkpoint(folder, shapes, args.shard_mb * 2**20)
        n_shards = len(list(folder.glob("*.safetensors")))
        db = f"sqlite:///{Path(tmp) / 'runs.db'}"
        child = subprocess.run([sys.executable, "-c", _CHILD, str(folder), db],
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            sys.exit(f"specprof failed:\n{child.stderr}")
        # The child's own peak (VmHWM, KiB); see _CHILD.
        seconds, n_layers, peak_kib = child.stdout.split()
        peak_mib = int(peak_kib) / 1024
        floor = floor_seconds(folder)
    specprof_s = float(seconds)
    float32_mib = params * 4 / 2**20
    print(f"checkpoint: {params / 1e6:.1f}M parameters, {n_shards} bf16 shards, "
          f"{n_layers} matrices (float32 size {float32_mib:.0f} MiB)")
    print(f"specprof load+profile: {specprof_s:.2f} s   numpy svd floor: {floor:.2f} s   "
          f"ratio {specprof_s / floor:.2f}x")
    print(f"peak RSS of the profile process: {peak_mib:.0f} MiB "
          f"({peak_mib / float32_mib:.2f}x the float32 model size)")


if __name__ == "__main__":
    main()
