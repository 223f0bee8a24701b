"""Streaming HF import (moejax.interop.hf_stream) against the whole-model import.

Tiny DeepSeek-V3 and -V4 checkpoints are generated with numpy (no torch): random
variables exported by `hf.save` / `hf_v4.save`, then some weights re-stored as FP8 with
ragged block scales, V4 experts as packed FP4, one tensor as bf16, the files split into
shards. Streaming onto 8 devices with sharded leaves must give the whole-model import's
values bit for bit.
"""
import json
import pathlib
import random

import jax
import ml_dtypes
import numpy as np
import pytest
from test_v4 import _quant_fp4, _quant_fp8, _randomise_variables

pytest.importorskip("safetensors")  # the `hf` extra

from moejax.config.v4 import V4Config  # noqa: E402
from moejax.interop import hf, hf_config, hf_stream, hf_v4, safetensors_slices  # noqa: E402
from moejax.interop.lazy_view import LazyView, apply, source_box  # noqa: E402
from moejax.interop.safetensors_io import INDEX_FILE, dequantize_fp8  # noqa: E402
from moejax.interop.safetensors_slices import (Source, Stored, read_box,  # noqa: E402
                                               write_safetensors)
from moejax.sharding import make_mesh  # noqa: E402

MESHES = {"fsdp4_expert2": {"data": 1, "fsdp": 4, "expert": 2, "tensor": 1},
          "fsdp2_expert2_tensor2": {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}}


def _boxes(shape, count, seed=0):
    rand = random.Random(seed)
    for _ in range(count):
        box = []
        for n in shape:
            lo = rand.randrange(n)
            box.append((lo, rand.randrange(lo + 1, n + 1)))
        yield tuple(box)


def _cut(array, box):
    return array[tuple(slice(lo, hi) for lo, hi in box)]


@pytest.mark.parametrize("shape, rule", [
    ((12, 6), lambda w: w.T),
    ((12, 6), lambda w: w.T.reshape(6, 3, -1)),  # per head
    ((12, 6), lambda w: w[5:].T),  # kv_a's rope rows
    ((21, 5), lambda w: w.reshape(3, -1, 5)[:, 4:].transpose(2, 0, 1)),  # kv_b's values
    ((4, 10, 6), lambda w: w[:, :5].transpose(0, 2, 1)),  # fused gate_up's gate
    ((6, 24), lambda w: w.reshape(2, 3, 4, 6).transpose(3, 0, 2, 1)),
    ((5,), lambda w: w.astype(np.int32))])
def test_a_lazy_view_maps_every_box_back_to_its_source_box(shape, rule):
    w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    whole, view = rule(w), rule(LazyView("w", shape))
    assert view.shape == whole.shape
    for box in _boxes(whole.shape, 40):
        read = source_box(view, box)
        np.testing.assert_array_equal(apply(view, _cut(w, read), read, box), _cut(whole, box))


def test_a_lazy_view_refuses_reshapes_that_merge_axes():
    with pytest.raises(NotImplementedError, match="merges"):
        LazyView("w", (4, 6)).T.reshape(24)


def test_read_box_reads_any_box_of_any_dtype(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    tensors = {"f32": rng.normal(size=(7, 5, 6)).astype(np.float32),
               "bf16": rng.normal(size=(9, 13)).astype(ml_dtypes.bfloat16),
               "fp8": rng.normal(size=(6, 10)).astype(ml_dtypes.float8_e4m3fn),
               "i64": rng.integers(0, 9, (4, 3)), "vec": rng.normal(size=11).astype(np.float32)}
    write_safetensors(tmp_path / "t.safetensors", tensors)
    reader = hf.CheckpointReader(tmp_path)
    for chunk in (1 << 20, 16):  # whole rows per read / row by row down the axes
        monkeypatch.setattr(safetensors_slices, "CHUNK_BYTES", chunk)
        for name, array in tensors.items():
            path, dtype, shape, offset = reader.locate(name)
            stored = Stored(str(path), offset, np.dtype(safetensors_slices.ST_DTYPES[dtype]),
                            tuple(shape))
            for box in _boxes(array.shape, 20):
                got = read_box(stored, box)
                assert got.dtype == array.dtype
                np.testing.assert_array_equal(got, _cut(array, box), err_msg=f"{name} {box}")


def test_tile_dequantisation_of_a_box_equals_the_whole_tensor_dequantisers(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(130, 260)).astype(np.float32)
    q8, raw8, _ = _quant_fp8(w)  # e8m0 scales, 128 x 128 blocks, ragged edges
    inv = rng.uniform(0.5, 2, (5, 9)).astype(np.float32)  # fp32 scale_inv, 32 x 32 blocks
    q4, raw4, _ = _quant_fp4(w[:, :256])
    write_safetensors(tmp_path / "q.safetensors",
                      {"q8": q8, "s8": raw8, "inv": inv, "q4": q4, "s4": raw4})
    reader = hf.CheckpointReader(tmp_path)

    def stored(name):
        path, dtype, shape, offset = reader.locate(name)
        return Stored(str(path), offset, np.dtype(safetensors_slices.ST_DTYPES[dtype]),
                      tuple(shape))
    cases = [(Source("e8m0", stored("q8"), "fp8", stored("s8")), hf_v4.dequantize(q8, raw8)),
             (Source("inv", stored("q8"), "fp8", stored("inv"), (32, 32)),
              dequantize_fp8(q8, inv, (32, 32))),
             (Source("fp4", stored("q4"), "fp4", stored("s4"), (1, 32)),
              hf_v4.dequantize(q4, raw4))]
    for source, whole in cases:
        source.check()
        assert source.shape == whole.shape
        for box in _boxes(whole.shape, 30, seed=2):
            np.testing.assert_array_equal(source.read(box), _cut(whole, box),
                                          err_msg=f"{source.name} {box}")


def _fp8_blocks(w, block):
    """(e4m3 q, fp32 scale_inv) with one scale per block x block tile (ragged edges)."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    inv = np.zeros((rows, cols), np.float32)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            inv[i, j] = np.abs(tile).max() / 448.0
    full = np.repeat(np.repeat(inv, block, 0), block, 1)[:w.shape[0], :w.shape[1]]
    return (w / full).astype(ml_dtypes.float8_e4m3fn), inv


def _restore(folder: pathlib.Path, change) -> None:
    """Rewrites every shard of `folder` through `change(name, array) -> {name: array}`."""
    index = json.loads((folder / INDEX_FILE).read_text())
    weight_map = {}
    for file in sorted({*index["weight_map"].values()}):
        tensors = {}
        for name, array in hf_v4.read_safetensors(folder / file).items():
            tensors.update(change(name, np.array(array)))
        write_safetensors(folder / file, tensors)
        weight_map.update({name: file for name in tensors})
    (folder / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))


@pytest.fixture(scope="module")
def v3_folder(tmp_path_factory):
    """A tiny V3 + MTP checkpoint: FP8 attention / expert weights (32 x 32 blocks, ragged),
    a bf16 embedding, five shards."""
    hf_json = {"model_type": "deepseek_v3", "vocab_size": 128, "hidden_size": 64,
               "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
               "first_k_dense_replace": 1, "num_attention_heads": 4, "n_routed_experts": 8,
               "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4,
               "topk_group": 2, "kv_lora_rank": 32, "q_lora_rank": 48,
               "qk_rope_head_dim": 8, "v_head_dim": 16, "qk_nope_head_dim": 16,
               "max_position_embeddings": 256}
    model = hf_config.model_from_hf(hf_json, mtp_depth=1)
    variables = _randomise_variables(hf.abstract_variables(model), seed=7)
    folder = tmp_path_factory.mktemp("v3")
    hf.save(model, variables, folder, max_shard_bytes=60_000)

    def change(name, array):
        if name == "model.embed_tokens.weight":
            return {name: array.astype(ml_dtypes.bfloat16)}
        if name.endswith(("q_b_proj.weight", "kv_b_proj.weight", "o_proj.weight",
                          "experts.3.up_proj.weight", "experts.5.down_proj.weight")):
            q, inv = _fp8_blocks(array, 32)
            return {name: q, name + "_scale_inv": inv}
        return {name: array}
    _restore(folder, change)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [32, 32]}
    (folder / "config.json").write_text(json.dumps(config))
    assert len(json.loads((folder / INDEX_FILE).read_text())["weight_map"]) > 100
    return folder


@pytest.fixture(scope="module")
def v4_folder(tmp_path_factory):
    """A tiny V4 checkpoint (hash layers, CSA/HCA, MTP off): FP8 attention projections with
    e8m0 128 x 128 scales, FP4 routed experts, shards."""
    cfg = V4Config()
    variables = _randomise_variables(hf_v4.abstract_variables(cfg), seed=8)
    folder = tmp_path_factory.mktemp("v4")
    hf_v4.save(cfg, variables, folder, max_shard_bytes=200_000)

    def change(name, array):
        stem = name[:-len(".weight")]
        if ".ffn.experts." in name:
            q, s, _ = _quant_fp4(array)
            return {name: q, stem + ".scale": s}
        if name.endswith((".wq_b.weight", ".wkv.weight", ".wo_a.weight")):
            q, s, _ = _quant_fp8(array)
            return {name: q, stem + ".scale": s}
        return {name: array}
    _restore(folder, change)
    return folder


def _assert_same(streamed, reference):
    assert jax.tree.structure(streamed) == jax.tree.structure(reference)
    sharded = 0
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(streamed),
                                 jax.tree.leaves(reference)):
        assert got.dtype == np.asarray(want).dtype, path
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))
        sharded += not got.sharding.is_fully_replicated
    assert sharded > len(jax.tree.leaves(streamed)) // 2


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_v3_streaming_equals_the_whole_model_import(v3_folder, mesh):
    config, reference = hf.load(v3_folder)
    streamed_config, streamed = hf_stream.load_sharded(v3_folder, make_mesh(MESHES[mesh]))
    assert streamed_config.to_dict() == config.to_dict()
    assert config.model.mtp.depth == 1
    kinds = {(s.kind, s.weight.dtype.name) for s in hf_stream.plan(v3_folder).sources.values()}
    assert {("fp8", "float8_e4m3fn"), ("plain", "bfloat16"), ("plain", "float32")} == kinds
    _assert_same(streamed, reference)


def test_v3_streaming_in_bfloat16(v3_folder):
    _, reference = hf.load(v3_folder, dtype="bfloat16")
    _, streamed = hf_stream.load_sharded(v3_folder, make_mesh(MESHES["fsdp4_expert2"]),
                                         dtype="bfloat16")
    _assert_same(streamed, reference)


def test_v4_streaming_equals_the_whole_model_import(v4_folder):
    cfg, reference = hf_v4.load(v4_folder)
    p = hf_stream.plan(v4_folder)
    assert p.model == cfg
    assert {s.kind for s in p.sources.values()} == {"plain", "fp8", "fp4"}
    _, streamed = hf_stream.load_sharded(v4_folder, make_mesh(MESHES["fsdp2_expert2_tensor2"]))
    _assert_same(streamed, reference)


def test_streaming_refuses_what_the_whole_model_import_refuses(v3_folder, tmp_path):
    (tmp_path / "config.json").write_text((v3_folder / "config.json").read_text())
    index = json.loads((v3_folder / INDEX_FILE).read_text())
    for file in {*index["weight_map"].values()}:
        (tmp_path / file).symlink_to(v3_folder / file)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items()
                           if "layers.2.mlp.experts.4." not in k}
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    mesh = make_mesh(MESHES["fsdp4_expert2"])
    with pytest.raises(ValueError, match="moe_stack/layers/moe/gate"):
        hf_stream.load_sharded(tmp_path, mesh)


@pytest.mark.slow  # ~40 s: two imports (Orbax step-0 checkpoints) and two exports; the
# default suite runs the CLI through test_hf_v4_export.py::test_cli_import_then_export_...
def test_cli_streams_onto_the_mesh_and_exports_from_the_shards(v3_folder, tmp_path):
    """`import --mesh fsdp=4,expert=2` (dtype auto: bf16 for an FP8 checkpoint) writes a
    step-0 checkpoint of the streamed parameters; `export` restores only the variables and
    writes them back: the whole-model import's bf16 values, as `import --whole-model`
    (default mesh) then `export` give."""
    from moejax.interop import hf_cli
    work = tmp_path / "work"
    config_file = hf_cli.import_checkpoint(str(v3_folder), str(work),
                                           mesh_sizes=hf_cli.parse_mesh("fsdp=4,expert=2"))
    text = config_file.read_text()
    assert "'fsdp': 4" in text and "'expert': 2" in text and "'bfloat16'" in text
    assert hf_cli.export_checkpoint(str(work), str(tmp_path / "out")) == 0
    _, exported = hf.load(tmp_path / "out", dtype="bfloat16")
    _, reference = hf.load(v3_folder, dtype="bfloat16")
    jax.tree.map(np.testing.assert_array_equal, exported, reference)
    hf_cli.import_checkpoint(str(v3_folder), str(tmp_path / "whole"), whole_model=True)
    hf_cli.export_checkpoint(str(tmp_path / "whole"), str(tmp_path / "whole-out"))
    _, whole = hf.load(tmp_path / "whole-out", dtype="bfloat16")
    jax.tree.map(np.testing.assert_array_equal, whole, reference)
    with pytest.raises(ValueError, match="--mesh"):
        hf_cli.parse_mesh("fsdp=4,pipeline=2")


def test_each_device_reads_only_the_slice_it_owns(v3_folder, monkeypatch):
    """Mesh fsdp=4 x expert=2: an expert's weight lives on the 4 devices of its expert
    shard, each holding a quarter of D; so it is read 4 times, a quarter each time, and
    never by the other 4 devices."""
    reads = []
    original = Source.read
    monkeypatch.setattr(Source, "read", lambda self, box: reads.append(
        (self.name, box, self.shape)) or original(self, box))
    hf_stream.load_sharded(v3_folder, make_mesh(MESHES["fsdp4_expert2"]))
    expert = [r for r in reads if ".mlp.experts." in r[0]]
    counts = {}
    for name, box, shape in expert:
        counts[name] = counts.get(name, 0) + 1
        assert np.prod([hi - lo for lo, hi in box]) * 4 == np.prod(shape), (name, box)
    assert len(counts) == 3 * 8 * 3 and set(counts.values()) == {4}  # 2 MoE layers + MTP
