"""DeepSeek-V4 export: moejax variables -> HF folder -> DeepseekV4ForCausalLM / back."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_v4 import _randomise_variables

pytest.importorskip("safetensors")  # the `hf` extra

from moejax.interop import hf_v4  # noqa: E402
from moejax.config.v4 import V4Config, V4MTPConfig  # noqa: E402


def _without_hash_bias_rows(variables, cfg):
    """Hash layers' balance-bias rows are never used (training still moves them); HF has no
    place for them, so export drops them and import gives zeros."""
    bias = np.array(variables["moe_bias"]["bias"])
    bias[:cfg.moe.num_hash_layers] = 0
    return dict(variables, moe_bias=dict(variables["moe_bias"], bias=bias))


def _tree_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.mark.hf
def test_export_loads_in_transformers_with_the_same_logits(tmp_path):
    """Tiny V4 model (every path live) -> sharded save -> from_pretrained."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV4ForCausalLM"):
        pytest.skip("this transformers has no DeepSeek-V4")
    from moejax.model.v4.compressed import entry_visibility
    from moejax.model.v4.indexer import selection_gap
    from moejax.model.v4.model import TransformerV4

    cfg = V4Config()
    variables = _randomise_variables(hf_v4.abstract_variables(cfg), seed=3)
    tokens = jnp.asarray(np.random.default_rng(42).integers(0, 256, (2, 64)), jnp.int32)
    apply = jax.jit(lambda v, t: TransformerV4(cfg).apply(v, t, capture_intermediates=True))
    (logits, _), inter = apply(variables, tokens)
    for layer in ("layers_1", "layers_3"):  # the CSA top-k is not decided by a tie
        _, scores = inter["intermediates"]["layers"][layer]["attention"]["indexer"][
            "__call__"][0]
        visible = jnp.broadcast_to(entry_visibility(64, scores.shape[-1], 4)[None],
                                   scores.shape)
        assert float(selection_gap(scores, visible, cfg.attention.index_topk)) > 1e-4

    out = tmp_path / "export"
    hf_v4.save(cfg, variables, out, max_shard_bytes=1 << 19)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    model = transformers.DeepseekV4ForCausalLM.from_pretrained(out).eval()
    model.set_experts_implementation("eager")
    state = model.state_dict()
    np.testing.assert_array_equal(  # buffers: correction bias of learned layers, tid2eid
        state["model.layers.3.mlp.gate.e_score_correction_bias"].numpy(),
        variables["moe_bias"]["bias"][3])
    np.testing.assert_array_equal(
        state["model.layers.0.mlp.gate.tid2eid"].numpy(),
        variables["hash_routing"]["layers"]["layers_0"]["moe"]["router"]["tid2eid"])
    with torch.no_grad():
        ref = model(torch.tensor(np.asarray(tokens)).long()).logits.numpy()
    diff = float(np.abs(np.asarray(logits) - ref).max())
    print(f"\nV4 export -> from_pretrained (fp32): max |logits - moejax| = {diff:.3g}")
    assert diff <= 1e-4 and np.abs(ref).max() > 1.0

    loaded_cfg, loaded = hf_v4.load(out)  # import(export(v)) == v, config included
    assert loaded_cfg == cfg
    _tree_equal(loaded, _without_hash_bias_rows(variables, cfg))


def test_export_round_trip_with_mtp_scanned_layers_and_bfloat16(tmp_path):
    """Scanned stacks, an MTP block and its bias survive export -> import bit for bit;
    a bf16 export keeps HF's fp32 tensors in fp32."""
    base = V4Config()
    cfg = dataclasses.replace(
        base, scan_layers=True, num_layers=5, mtp=V4MTPConfig(depth=1),
        attention=dataclasses.replace(base.attention,
                                      layer_types=("sliding", "csa", "hca", "csa", "hca")),
        moe=dataclasses.replace(base.moe, num_hash_layers=1, swiglu_limit=0.0))
    variables = _randomise_variables(hf_v4.abstract_variables(cfg), seed=4)
    assert "stack_1" in variables["params"]["layers"]  # (csa, hca) x 2 is one scan
    hf_v4.save(cfg, variables, tmp_path / "fp32")
    loaded_cfg, loaded = hf_v4.load(tmp_path / "fp32", scan_layers=True)
    assert loaded_cfg == cfg  # incl. swiglu_limit 0 (no clamp) via NO_CLAMP
    _tree_equal(loaded, _without_hash_bias_rows(variables, cfg))
    hf = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert hf["num_nextn_predict_layers"] == 1 and hf["mlp_layer_types"][:2] == [
        "hash_moe", "moe"]

    hf_v4.save(cfg, variables, tmp_path / "bf16", dtype="bfloat16")
    tensors = hf_v4.read_safetensors(tmp_path / "bf16" / "model.safetensors")
    fp32 = {k for k, v in tensors.items() if v.dtype == np.float32}
    assert "model.layers.1.attn.wq_a.weight" not in fp32
    assert {"model.layers.1.attn.attn_sink", "model.layers.1.hc_attn_fn",
            "model.layers.1.attn.compressor.ape", "model.layers.1.ffn.gate.bias",
            "model.layers.1.attn.norm.weight", "mtp.0.ffn.gate.bias",
            "model.hc_head.hc_scale"} <= fp32
    assert tensors["model.layers.0.ffn.gate.tid2eid"].dtype == np.int64
    assert "model.layers.0.ffn.gate.bias" not in tensors  # hash layers have no bias
    _, bf16 = hf_v4.load(tmp_path / "bf16", scan_layers=True)
    q_a = variables["params"]["layers"]["layers_0"]["attention"]["q_a"]
    np.testing.assert_allclose(bf16["params"]["layers"]["layers_0"]["attention"]["q_a"], q_a,
                               rtol=1e-2)


def test_export_refuses_what_hf_cannot_hold(tmp_path):
    base = V4Config()
    variables = hf_v4.abstract_variables(base)
    for cfg, field in [
            (dataclasses.replace(base, moe=dataclasses.replace(base.moe, num_shared_experts=2)),
             "moe.num_shared_experts"),
            (dataclasses.replace(base, moe=dataclasses.replace(base.moe, score_fn="softmax")),
             "moe.score_fn"),
            (dataclasses.replace(base, mtp=V4MTPConfig(depth=1, layer_type="csa")),
             "mtp.layer_type")]:
        with pytest.raises(ValueError, match=field):
            hf_v4.save(cfg, variables, tmp_path)


def test_cli_import_then_export_gives_back_the_same_folder(tmp_path):
    """`python -m moejax.interop import` / `export` dispatch on the V4 model type: a V4
    folder -> a step-0 training checkpoint (hash tables in its frozen state) -> the same
    tensors and config.json."""
    from moejax.interop.hf_cli import export_checkpoint, import_checkpoint
    cfg = dataclasses.replace(V4Config(), vocab_size=384)  # the default byte tokenizer's
    variables = _without_hash_bias_rows(
        _randomise_variables(hf_v4.abstract_variables(cfg), seed=5), cfg)
    hf_v4.save(cfg, variables, tmp_path / "hf")
    config_file = import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "work"))
    assert "deepseek_v4" in config_file.read_text()
    assert export_checkpoint(str(tmp_path / "work"), str(tmp_path / "out")) == 0
    before = hf_v4.read_safetensors(tmp_path / "hf" / "model.safetensors")
    after = hf_v4.read_safetensors(tmp_path / "out" / "model.safetensors")
    assert sorted(before) == sorted(after)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert (json.loads((tmp_path / "out" / "config.json").read_text())
            == json.loads((tmp_path / "hf" / "config.json").read_text()))
