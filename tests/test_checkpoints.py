"""Weights-only checkpoints: safetensors (files, shards), state dicts, LoRA adapters, GGUF.

Every checkpoint is generated here (no downloads); the oracle is NumPy's SVD of the tensor as
the generating library holds it (torch's own bf16 -> float32, gguf's own dequantization),
never specprof's reading of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from specprof.engine import api
from specprof.engine.errors import ModelLoadError, StoreError
from specprof.engine.naming import block_of, role_of
from specprof.engine.store import parse_where

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

RTOL = 1e-5  # relative to sigma_max


def svdvals(matrix: np.ndarray) -> np.ndarray:
    """The oracle: all singular values, descending, in float64."""
    matrix = np.asarray(matrix, dtype=np.float64)
    return np.linalg.svd(matrix.reshape(matrix.shape[0], -1), compute_uv=False)


def assert_spectrum(values: np.ndarray, expected: np.ndarray, rtol: float = RTOL) -> None:
    values = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    assert values.shape == expected.shape
    np.testing.assert_allclose(values, expected, rtol=0, atol=rtol * expected[0])


def llama_tensors(blocks: int = 2, hidden: int = 24, kv: int = 8, ffn: int = 40, vocab: int = 50,
                  dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A tiny Llama-shaped state dict (GQA k/v, gated MLP, norms, position_ids)."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
               "model.norm.weight": torch.ones(hidden, dtype=dtype),
               "model.position_ids": torch.arange(16)[None]}
    for b in range(blocks):
        prefix = f"model.layers.{b}."
        tensors |= {prefix + "self_attn.q_proj.weight": rand(hidden, hidden),
                    prefix + "self_attn.k_proj.weight": rand(kv, hidden),
                    prefix + "self_attn.v_proj.weight": rand(kv, hidden),
                    prefix + "self_attn.o_proj.weight": rand(hidden, hidden),
                    prefix + "mlp.gate_proj.weight": rand(ffn, hidden),
                    prefix + "mlp.up_proj.weight": rand(ffn, hidden),
                    prefix + "mlp.down_proj.weight": rand(hidden, ffn),
                    prefix + "input_layernorm.weight": torch.ones(hidden, dtype=dtype)}
    return tensors


def oracle(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: svdvals(t.float().numpy()) for name, t in tensors.items()
            if t.is_floating_point() and t.dim() >= 2}


def check_layers(loaded: object, expected: dict[str, np.ndarray]) -> None:
    layers = {layer.name: layer for layer in loaded.layers}  # type: ignore[attr-defined]
    assert set(layers) == set(expected)
    for name, values in expected.items():
        assert_spectrum(api.singular_values(layers[name], "exact").values, values)


# -- names -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "block", "role"), [
    ("model.layers.12.self_attn.q_proj.weight", 12, "q"),      # Llama / Mistral / Qwen2
    ("model.layers.3.self_attn.o_proj.weight", 3, "o"),
    ("model.layers.3.mlp.gate_proj.weight", 3, "gate"),
    ("model.embed_tokens.weight", None, "embedding"),
    ("lm_head.weight", None, "head"),
    ("transformer.h.5.attn.c_attn.weight", 5, "qkv"),           # GPT-2
    ("transformer.h.5.attn.c_proj.weight", 5, "o"),
    ("transformer.h.5.mlp.c_proj.weight", 5, "down"),
    ("gpt_neox.layers.2.attention.query_key_value.weight", 2, "qkv"),  # NeoX
    ("gpt_neox.layers.2.mlp.dense_4h_to_h.weight", 2, "down"),
    ("encoder.layer.7.attention.self.value.weight", 7, "v"),    # BERT / RoBERTa
    ("encoder.layer.7.attention.output.dense.weight", 7, "o"),
    ("encoder.layer.7.output.dense.weight", 7, "down"),
    ("embeddings.word_embeddings.weight", None, "embedding"),
    ("encoder.block.4.layer.0.SelfAttention.k.weight", 4, "k"),  # T5
    ("decoder.block.1.layer.2.DenseReluDense.wo.weight", 1, "down"),
    ("shared.weight", None, "embedding"),
    ("blk.9.attn_v.weight", 9, "v"),                           # GGUF
    ("blk.9.ffn_gate.weight", 9, "gate"),
    ("token_embd.weight", None, "embedding"),
    ("output.weight", None, "head"),
    ("layers.0.attention.wo.weight", 0, "o"),                   # Meta's original Llama
    ("model.layers.0.self_attn.W_pack.weight", 0, "qkv"),       # Baichuan
    ("pooler.dense.weight", None, "other"),
])
def test_block_and_role_from_names(name: str, block: int | None, role: str) -> None:
    assert block_of(name) == block
    assert role_of(name) == role


def test_where_accepts_role_words_and_block_numbers_only() -> None:
    assert parse_where("role = 'v' and block < 4") == [("role", "=", "v"), ("block", "<", 4.0)]
    for bad in ("role = v", "role < 'v'", "block = 'x'", "role = 'v'; DROP TABLE layers",
                "role = 'v' or 1 = 1", "name = 'x'"):
        with pytest.raises(StoreError):
            parse_where(bad)


# -- safetensors -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_safetensors_file_every_float_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = llama_tensors(blocks=1, dtype=dtype)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(tensors, path)
    loaded = api.load_model(path)
    assert loaded.format == "safetensors" and loaded.proto is None
    check_layers(loaded, oracle(tensors))
    by_name = {layer.name: layer for layer in loaded.layers}
    q = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert (q.block, q.role, q.weight.dtype) == (0, "q", np.float32)
    skipped = {node.name: node.reason for node in loaded.skipped}
    assert "integer buffer" in skipped["model.position_ids"]
    assert "not a matrix" in skipped["model.norm.weight"]


@pytest.mark.parametrize("with_index", [True, False])
def test_safetensors_shards_with_and_without_index(tmp_path: Path, with_index: bool) -> None:
    tensors = llama_tensors(blocks=3)
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        safetensors_torch.save_file({k: tensors[k] for k in keys}, tmp_path / file)
    if with_index:
        weight_map = {k: file for file, keys in shards.items() for k in keys}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = api.load_model(tmp_path)
    assert loaded.format == "safetensors"
    check_layers(loaded, oracle(tensors))
    assert sorted(layer.block for layer in loaded.layers if layer.role == "v") == [0, 1, 2]


def test_index_naming_a_missing_shard_is_one_error(tmp_path: Path) -> None:
    safetensors_torch.save_file(llama_tensors(blocks=1), tmp_path / "a.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}))
    with pytest.raises(ModelLoadError, match=r"missing: b\.safetensors"):
        api.load_model(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_truncated_safetensors_is_one_error(tmp_path: Path, dtype: torch.dtype) -> None:
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({"fc.weight": torch.randn(64, 64).to(dtype)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    loaded = api.load_model(path)  # shapes come from the header: reading is deferred
    with pytest.raises(ModelLoadError, match=r"fc\.weight"):
        list(loaded.layers)


def test_conv_kernel_and_fused_projection_notes(tmp_path: Path) -> None:
    tensors = {"features.0.weight": torch.randn(8, 3, 3, 3),
               "transformer.h.0.attn.c_attn.weight": torch.randn(16, 48)}
    safetensors_torch.save_file(tensors, tmp_path / "m.safetensors")
    loaded = api.load_model(tmp_path / "m.safetensors")
    by_name = {layer.name: layer for layer in loaded.layers}
    conv = by_name["features.0.weight"]
    assert conv.weight.shape == (8, 27) and "filter SVD only" in conv.note
    assert "fused q/k/v" in by_name["transformer.h.0.attn.c_attn.weight"].note
    check_layers(loaded, oracle(tensors))


# -- state dicts -------------------------------------------------------------------------------

def test_state_dict_is_read_weights_only(tmp_path: Path) -> None:
    tensors = llama_tensors(blocks=1, dtype=torch.float32)
    path = tmp_path / "pytorch_model.bin"  # found by content: a torch.save zip
    torch.save({"state_dict": tensors, "epoch": 3}, path)
    loaded = api.load_model(path)
    assert loaded.format == "torch" and loaded.proto is None
    check_layers(loaded, oracle(tensors))


class _RunsCode:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this pickle runs code",))


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.randn(4, 4), "payload": _RunsCode()}, path)
    with pytest.raises(ModelLoadError, match=r"weights_only=True"):
        api.load_model(path)


# -- LoRA ----------------------------------------------------------------------------------

def write_adapter(folder: Path, rank: int, alpha: float, shapes: dict[str, tuple[int, int]],
                  rslora: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder.mkdir()
    generator = torch.Generator().manual_seed(1)
    tensors, factors = {}, {}
    for module, (m, n) in shapes.items():
        a, b = torch.randn(rank, n, generator=generator), torch.randn(m, rank, generator=generator)
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
        factors[module] = (b.numpy(), a.numpy())
    safetensors_torch.save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
              "target_modules": ["q_proj", "v_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return factors


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_update_spectrum_from_qr_factors(tmp_path: Path, rslora: bool) -> None:
    rank, alpha = 4, 16.0
    shapes = {"model.layers.0.self_attn.q_proj": (64, 48),
              "model.layers.1.self_attn.v_proj": (16, 48)}
    factors = write_adapter(tmp_path / "adapter", rank, alpha, shapes, rslora)
    loaded = api.load_model(tmp_path / "adapter")
    assert loaded.format == "lora" and [layer.name for layer in loaded.layers] == list(shapes)
    scale = alpha / (np.sqrt(rank) if rslora else rank)
    for layer in loaded.layers:
        b, a = factors[layer.name]
        expected = svdvals(scale * b.astype(np.float64) @ a.astype(np.float64))[:rank]
        assert_spectrum(api.singular_values(layer, "exact").values, expected, rtol=1e-6)
        assert "LoRA update" in layer.note and layer.weight.shape == (rank, rank)
    assert [(layer.block, layer.role) for layer in loaded.layers] == [(0, "q"), (1, "v")]


def test_rank_one_lora_is_still_a_layer(tmp_path: Path) -> None:
    factors = write_adapter(tmp_path / "adapter", 1, 2.0, {"model.layers.0.mlp.down_proj": (8, 5)})
    (layer,) = api.load_model(tmp_path / "adapter").layers
    b, a = factors["model.layers.0.mlp.down_proj"]
    assert_spectrum(api.singular_values(layer, "exact").values,
                    svdvals(2.0 * b.astype(np.float64) @ a)[:1], rtol=1e-6)


# -- GGUF --------------------------------------------------------------------------------------

def _k_quant_blocks(rng: np.random.Generator, rows: int, blocks: int, size: int,
                    scale_offsets: tuple[int, ...]) -> np.ndarray:
    """Random K-quant blocks with finite float16 scales at ``scale_offsets`` (gguf-py can
    dequantize Q4_K/Q6_K but not quantize them)."""
    raw = rng.integers(0, 256, size=(rows, blocks, size), dtype=np.uint8)
    for offset in scale_offsets:
        scales = rng.uniform(0.01, 0.1, size=(rows, blocks)).astype("<f2")
        raw[:, :, offset:offset + 2] = scales.view(np.uint8).reshape(rows, blocks, 2)
    return raw.reshape(rows, blocks * size)


def write_gguf(path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    types = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    matrix = rng.standard_normal((24, 256)).astype(np.float32)
    writer.add_tensor("token_embd.weight", matrix)
    writer.add_tensor("blk.0.attn_q.weight", matrix.astype(np.float16))
    for name, kind in (("blk.0.attn_k.weight", types.Q8_0), ("blk.0.attn_v.weight", types.Q4_0),
                       ("blk.0.attn_output.weight", types.BF16)):
        data = quantize(matrix, kind)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
    q4k = _k_quant_blocks(rng, 8, 2, 144, (0, 2))  # d, dmin at the start of each block
    writer.add_tensor("blk.0.ffn_up.weight", q4k, raw_shape=q4k.shape, raw_dtype=types.Q4_K)
    q6k = _k_quant_blocks(rng, 8, 2, 210, (208,))  # d at the end of each block
    writer.add_tensor("blk.0.ffn_down.weight", q6k, raw_shape=q6k.shape, raw_dtype=types.Q6_K)
    writer.add_tensor("output_norm.weight", np.ones(256, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_values_are_those_of_ggufs_dequantization(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    path = tmp_path / "model.gguf"
    write_gguf(path)
    expected, kinds = {}, {}
    for tensor in gguf.GGUFReader(path).tensors:
        if len(tensor.shape) >= 2:
            shape = tuple(int(n) for n in reversed(list(tensor.shape)))
            expected[tensor.name] = svdvals(dequantize(tensor.data, tensor.tensor_type).reshape(shape))
            kinds[tensor.name] = tensor.tensor_type.name
    loaded = api.load_model(path)
    assert loaded.format == "gguf"
    check_layers(loaded, expected)
    assert set(kinds.values()) >= {"F32", "F16", "Q8_0", "Q4_0", "BF16", "Q4_K", "Q6_K"}
    for layer in loaded.layers:
        if kinds[layer.name] != "F32":
            assert f"quantization {kinds[layer.name]}" in layer.note
    assert [node.name for node in loaded.skipped] == ["output_norm.weight"]


# -- the command line, end to end --------------------------------------------------------------

def specprof(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "specprof", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_cli_profile_and_query_by_role_and_block(tmp_path: Path) -> None:
    tensors = llama_tensors(blocks=3)
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    safetensors_torch.save_file(tensors, folder / "model.safetensors")
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    layers = specprof("layers", str(folder), "--output-format", "json")
    assert layers.returncode == 0, layers.stderr
    rows = {row["layer"]: row for row in json.loads(layers.stdout)}
    assert rows["model.position_ids"]["status"] == "skipped"
    assert rows["model.layers.2.self_attn.k_proj.weight"]["block"] == 2

    profile = specprof("profile", str(folder), "--db", db, "-q")
    assert profile.returncode == 0, profile.stderr

    query = specprof("query", "--db", db, "--where", "role = 'v'", "--values", "--format", "json")
    assert query.returncode == 0, query.stderr
    found = json.loads(query.stdout)
    assert sorted(row["block"] for row in found) == [0, 1, 2]
    expected = oracle(tensors)
    for row in found:
        assert row["role"] == "v"
        assert_spectrum(np.array(row["singular_values"]), expected[row["layer"]])

    early = specprof("query", "--db", db, "--where", "block < 1", "--format", "json")
    assert {row["role"] for row in json.loads(early.stdout)} == {
        "q", "k", "v", "o", "gate", "up", "down"}

    import sqlite3  # the view SQL users read has the new columns too

    with sqlite3.connect(tmp_path / "runs.db") as connection:
        view = connection.execute("SELECT block, role FROM layer_summary WHERE role = 'k' "
                                  "ORDER BY block").fetchall()
    assert view == [(0, "k"), (1, "k"), (2, "k")]

    bad = specprof("query", "--db", db, "--where", "role = v")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr + bad.stdout


def test_cli_format_forces_the_importer(tmp_path: Path) -> None:
    path = tmp_path / "weights.data"  # an unknown suffix: the content decides, or --format
    safetensors_torch.save_file({"fc.weight": torch.randn(6, 5)}, path)
    sniffed = specprof("layers", str(path), "--output-format", "json")
    assert sniffed.returncode == 0, sniffed.stderr
    forced = specprof("layers", str(path), "--format", "gguf", "--output-format", "json")
    assert forced.returncode == 1 and "Traceback" not in forced.stderr


# -- streaming ---------------------------------------------------------------------------------

def test_layers_are_streamed_and_a_second_profile_reuses_the_first(tmp_path: Path) -> None:
    from specprof.engine.types import Layer, StreamedLayers

    tensors = llama_tensors(blocks=2, dtype=torch.float32)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(tensors, path)
    loaded = api.load_model(path)
    assert isinstance(loaded.layers, StreamedLayers)
    expected = oracle(tensors)
    assert loaded.n_params == sum(t.numel() for n, t in tensors.items() if n in expected)
    first, again = loaded.layers[3], loaded.layers[3]
    assert first is not again  # built anew each time: nothing is held between requests
    weight = tensors[first.name].numpy()
    eager = Layer(name=first.name, op_type="MatMul", weight=weight, input_shape=(weight.shape[1],))
    assert first.content_hash == again.content_hash == eager.content_hash
    assert [layer.name for layer in loaded.layers[-2:]] == [layer.name for layer in loaded.layers][-2:]
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    assert set(api.profile(path, db=db, precision="float32")["status"]) == {"ok"}
    assert set(api.profile(path, db=db, precision="float32")["status"]) == {"reused"}


def test_top_k_gives_the_largest_values(tmp_path: Path) -> None:
    tensors = {"model.layers.0.mlp.up_proj.weight": torch.randn(40, 30)}
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(tensors, path)
    from specprof.engine.store import Store

    db = f"sqlite:///{tmp_path / 'runs.db'}"
    run = api.profile(path, db=db, top_k=3, precision="float32").attrs["run_id"]
    with Store.open(db) as store:
        frame = store.query(run=run, values=True)
    assert not frame["complete"].iloc[0]
    (values,) = frame["singular_values"]
    expected = oracle(tensors)["model.layers.0.mlp.up_proj.weight"]
    np.testing.assert_allclose(values, expected[:3], rtol=0, atol=RTOL * expected[0])


def test_gguf_without_its_extra_names_the_extra(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from specprof.engine.errors import MissingExtraError
    from specprof.plugins.importers.gguf_importer import GgufImporter

    path = tmp_path / "model.gguf"
    write_gguf(path)
    monkeypatch.setattr(GgufImporter, "requires", ("gguf_is_not_installed",))
    with pytest.raises(MissingExtraError, match="'gguf' extra") as refused:
        api.load_model(path)
    assert "pip install 'specprof[gguf]'" in refused.value.hint


def test_export_of_a_checkpoint_run_keeps_block_and_role(tmp_path: Path) -> None:
    from specprof.engine.store import Store
    from specprof.engine.store.exchange import validate_export

    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(llama_tensors(blocks=1), path)
    run = api.profile(path, db=f"sqlite:///{tmp_path / 'a.db'}").attrs["run_id"]
    with Store.open(f"sqlite:///{tmp_path / 'a.db'}") as store:
        document = store.export_run(run)
    validate_export(document)
    roles = {layer["name"]: (layer["block"], layer["role"]) for layer in document["layers"]}
    assert roles["model.layers.0.self_attn.k_proj.weight"] == (0, "k")
    with Store.open(f"sqlite:///{tmp_path / 'b.db'}") as store:
        copy = store.import_run(document)
        frame = store.query(run=copy, where="role = 'k'")
    assert frame["layer"].tolist() == ["model.layers.0.self_attn.k_proj.weight"]


def test_report_groups_a_checkpoint_by_block_and_role(tmp_path: Path) -> None:
    from specprof.engine.store import Store
    from specprof.plugins.analyzers.report import build_report

    path = tmp_path / "model.safetensors"
    tensors = llama_tensors(blocks=3, hidden=32, ffn=64)
    safetensors_torch.save_file(tensors, path)
    db = f"sqlite:///{tmp_path / 'a.db'}"
    run = api.profile(path, db=db).attrs["run_id"]
    cnn = api.profile(Path(__file__).parent.parent / "examples" / "small_cnn.onnx",
                      db=db).attrs["run_id"]
    with Store.open(db) as store:
        html = build_report(store, run)
        plain = build_report(store, cnn)
    section = html[html.index("By transformer block and role"):]
    roles = section[:section.index("</table>")]
    for role in ("q", "k", "v", "o", "gate", "up", "down", "embedding", "head"):
        assert f'<td class="text">{role}</td>' in roles
    expected = max(svdvals(tensors[f"model.layers.{b}.self_attn.q_proj.weight"].float().numpy())[0]
                   for b in range(3))
    q_row = roles[roles.index('<td class="text">q</td>'):].split("</tr>")[0]
    shown = float(q_row.split("<td")[-1].split(">")[1].split("<")[0])  # the last cell
    assert shown == pytest.approx(expected, rel=1e-4)  # max sigma_max of q over the blocks
    assert 'id="sigma-max-by-block"' in section
    assert "By transformer block and role" not in plain


def test_api_profiles_checkpoints_in_float32_and_graphs_in_float64(tmp_path: Path) -> None:
    from specprof.engine.store import Store

    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(llama_tensors(blocks=1), path)
    db = f"sqlite:///{tmp_path / 'a.db'}"
    both = api.profile([path, Path(__file__).parent.parent / "examples" / "small_cnn.onnx"], db=db)
    asked = api.profile(path, db=db, precision="float64", force=True)
    with Store.open(db) as store:
        configs = {run: store.run_info(run)["config"]["precision"]
                   for run in [*both.attrs["runs"].values(), asked.attrs["run_id"]]}
    assert sorted(configs.values()) == ["float32", "float64", "float64"]
    assert configs[both.attrs["runs"][str(path)]] == "float32"
