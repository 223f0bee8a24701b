"""DeepSeek-V4: mHC Sinkhorn, hash routing, clamp, config, plan numbers, HF parity."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.model.v4.hyper import HyperConnection, sinkhorn
from moejax.config.v4 import V4Config, V4MoEConfig, v4_config
from moejax.model.layers import clamped_swiglu
from moejax.model.moe.capacity import DISPATCH
from moejax.model.v4.moe import V4MoE, V4Router, random_tid2eid

# ----------------------------------------------------------------------------- mHC


def _sinkhorn_reference(logits: np.ndarray, iters: int, eps: float) -> np.ndarray:
    """mHC Sinkhorn (docs/deepseek_v3_v4.md) in float64 numpy: row softmax + eps, columns,
    then (rows, columns) x iters-1."""
    c = np.exp(logits - logits.max(-1, keepdims=True))
    c = c / c.sum(-1, keepdims=True) + eps
    c = c / (c.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdims=True) + eps)
        c = c / (c.sum(-2, keepdims=True) + eps)
    return c


def test_sinkhorn_is_doubly_stochastic_and_matches_the_recipe():
    logits = np.random.default_rng(0).normal(0, 1, (64, 4, 4))
    c = np.asarray(sinkhorn(jnp.asarray(logits, jnp.float32), 20, 1e-6))
    np.testing.assert_allclose(c, _sinkhorn_reference(logits, 20, 1e-6), atol=1e-6)
    np.testing.assert_allclose(c.sum(-2), 1.0, atol=1e-5)  # ends on a column step
    np.testing.assert_allclose(c.sum(-1), 1.0, atol=1e-4)  # rows: approximately
    assert (c > 0).all()
    peaked = np.random.default_rng(1).normal(0, 2, (64, 4, 4))  # converges more slowly
    rows = np.asarray(sinkhorn(jnp.asarray(peaked, jnp.float32), 100, 1e-6)).sum(-1)
    np.testing.assert_allclose(rows, 1.0, atol=1e-4)
    one = np.asarray(sinkhorn(jnp.asarray(logits, jnp.float32), 1, 1e-6))
    assert np.abs(one.sum(-1) - 1).max() > 1e-2  # one iteration is not yet balanced


def test_hyper_connection_maps():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 4, 8)), jnp.float32)
    hc = HyperConnection(4, 20, 1e-6)
    variables = jax.jit(hc.init)(jax.random.key(1), x)
    post, comb, collapsed = jax.jit(hc.apply)(variables, x)
    assert post.shape == (2, 5, 4) and comb.shape == (2, 5, 4, 4)
    assert collapsed.shape == (2, 5, 8)
    assert float(post.min()) > 0 and float(post.max()) < 2
    np.testing.assert_allclose(comb.sum(-2), 1.0, atol=1e-5)
    # base 0, scale 1 at init: pre = sigmoid(mix) + eps, collapse = sum_j pre_j x_j.
    flat = x.reshape(2, 5, -1)
    flat = flat / jnp.sqrt(jnp.mean(flat ** 2, -1, keepdims=True) + 1e-6)
    pre = jax.nn.sigmoid(flat @ variables["params"]["fn"].value[:, :4]) + 1e-6
    np.testing.assert_allclose(collapsed, jnp.einsum("blnd,bln->bld", x, pre), atol=1e-5)


# ----------------------------------------------------------------------------- MoE


def test_hash_routing_uses_the_table_and_ignores_the_bias():
    cfg = V4MoEConfig(num_experts=8, top_k=2, routed_scaling_factor=1.5)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 16)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 32, (2, 6)), jnp.int32)
    router = V4Router(cfg, is_hash=True, vocab_size=32)
    variables = jax.jit(router.init)(jax.random.key(2), x, jnp.zeros(8), tokens)
    table = variables["hash_routing"]["tid2eid"]
    assert table.shape == (32, 2) and table.dtype == jnp.int32
    assert (table[:, 0] != table[:, 1]).all()  # distinct experts per token
    assert "tid2eid" not in variables["params"]
    routing = jax.jit(router.apply)(variables, x, jnp.full(8, 100.0).at[3].set(-100.0), tokens)
    np.testing.assert_array_equal(routing.indices, table[tokens])
    scores = jnp.sqrt(jax.nn.softplus(x @ variables["params"]["kernel"].value))
    w = jnp.take_along_axis(scores, table[tokens], -1)
    np.testing.assert_allclose(routing.weights, 1.5 * w / w.sum(-1, keepdims=True), rtol=1e-5)
    learned = V4Router(cfg, is_hash=False, vocab_size=32)
    lv = jax.jit(learned.init)(jax.random.key(2), x, jnp.zeros(8), tokens)
    picked = jax.jit(learned.apply)(lv, x, jnp.zeros(8).at[3].set(100.0), tokens).indices
    assert (picked == 3).any(-1).all()  # the learned router follows the bias


def test_router_entropy_is_nan_on_hash_layers_only():
    """Hash layers pick experts by token id: their score entropy is reported as NaN."""
    cfg = V4MoEConfig(num_experts=8, top_k=2, expert_hidden=8, num_shared_experts=0)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 16)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 32, (2, 6)), jnp.int32)
    mask = jnp.ones((2, 6), bool)
    for is_hash in (True, False):
        moe = V4MoE(cfg, is_hash=is_hash, vocab_size=32)
        variables = jax.jit(moe.init)(jax.random.key(0), x, jnp.zeros(8), tokens, mask)
        entropy = float(jax.jit(moe.apply)(variables, x, jnp.zeros(8), tokens, mask)[1][
            "router_entropy"])
        assert np.isnan(entropy) if is_hash else 0 < entropy <= np.log(8)


def test_random_tid2eid_is_balanced_enough():
    table = np.asarray(random_tid2eid(jax.random.key(0), 4096, 16, 4))
    assert all(len(set(row)) == 4 for row in table[:64])
    counts = np.bincount(table.ravel(), minlength=16)
    assert counts.min() > 0.8 * counts.mean()


def test_clamp_in_routed_and_shared_experts():
    rng = np.random.default_rng(0)
    g, u = rng.normal(0, 5, 100).astype(np.float32), rng.normal(0, 5, 100).astype(np.float32)
    expected = (np.minimum(g, 2) / (1 + np.exp(-np.minimum(g, 2)))) * np.clip(u, -2, 2)
    np.testing.assert_allclose(clamped_swiglu(jnp.asarray(g), jnp.asarray(u), 2.0), expected,
                               rtol=1e-5, atol=1e-6)
    x = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
    idx = jnp.asarray(np.argsort(rng.random((2, 16, 4)), -1)[..., :2], jnp.int32)
    w = jnp.asarray(rng.random((2, 16, 2)), jnp.float32)
    weights = tuple(jnp.asarray(rng.normal(size=s), jnp.float32)
                    for s in [(4, 8, 6), (4, 8, 6), (4, 6, 8)])
    mask = jnp.ones((2, 16), bool)
    run = jax.jit(lambda name, limit: DISPATCH[name](x, idx, w, mask, weights, 0.0, limit),
                  static_argnums=(0, 1))
    dense, _ = run("dense", 0.5)
    index, dropped = run("index", 0.5)
    unclamped, _ = run("dense", 0.0)
    np.testing.assert_allclose(index, dense, atol=1e-5)
    assert int(dropped) == 0
    assert float(jnp.abs(dense - unclamped).max()) > 0.1  # the clamp bites


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="model.attention.layer_types"):
        v4_config({"num_layers": 3})
    with pytest.raises(ValueError, match="model.moe.score_fn"):
        v4_config({"moe": {"score_fn": "relu"}})
    with pytest.raises(ValueError, match="model.attention.o_groups"):
        v4_config({"attention": {"o_groups": 3}})
    with pytest.raises(ValueError, match="model.attention.query_tile"):
        v4_config({"attention": {"query_tile": 20}})  # not a multiple of sliding_window=16
    with pytest.raises(ValueError, match="unknown field"):
        v4_config({"attention": {"window": 3}})
    assert v4_config({}) == V4Config()


# ----------------------------------------------------------------------------- plan


def _spec_count(c):
    """V4 parameter count per layer from the config alone (independent of the model code)."""
    a, e, n, d = c.attention, c.moe, c.hc.hc_mult, c.embed_dim
    dq, h, dh, g, r = a.q_lora_rank, a.num_heads, a.head_dim, a.o_groups, a.o_lora_rank
    hi, di = a.index_heads, a.index_head_dim

    def layer(kind, is_hash):
        p = d * dq + dq + dq * h * dh + d * dh + dh + h * dh * r + g * r * d + h
        if kind == "csa":
            m = a.csa_rate
            p += 2 * d * 2 * dh + m * 2 * dh + dh + 2 * d * 2 * di + m * 2 * di + di
            p += dq * hi * di + d * hi
        elif kind == "hca":
            p += 2 * d * dh + a.hca_rate * dh + dh
        p += 2 * ((2 + n) * n * n * d + (2 + n) * n + 3) + 2 * d
        p += e.num_experts * d + (0 if is_hash else e.num_experts)
        return p + (e.num_experts + 1) * 3 * d * e.expert_hidden

    total = sum(layer(k, i < e.num_hash_layers) for i, k in enumerate(a.layer_types))
    total += 2 * c.vocab_size * d + d + n * n * d + n + 1
    mtp = layer("sliding", False) + 2 * d * d + 3 * d + n * n * d + n + 1
    unused = c.num_layers * (e.num_experts - e.top_k) * 3 * d * e.expert_hidden
    return total, mtp, total - unused - c.vocab_size * d


@pytest.mark.parametrize("size,total,with_mtp,active", [
    ("flash", 284.332e9, 290.94e9, 13.27e9), ("pro", 1.5730e12, 1.5988e12, 48.85e9)])
def test_plan_matches_spec(size, total, with_mtp, active):
    from moejax.config import load_config_file
    from moejax.plan import plan
    cfg = load_config_file(f"configs/deepseek_v4.py:{size}")
    got = plan(cfg)
    exact = _spec_count(v4_config(cfg.model))
    assert (got["total_params"], got["mtp_params"], got["active_params"]) == exact
    rel = lambda a, b: abs(a - b) / b  # noqa: E731
    assert rel(got["total_params"], total) < 5e-5
    assert rel(got["total_params"] + got["mtp_params"], with_mtp) < 5e-5
    assert rel(got["active_params"], active) < 5e-4
    assert got["embedding_params"] == 129280 * cfg.model.embed_dim
    assert got["flops_per_token"] > 6 * got["active_params"]


# ----------------------------------------------------------------------------- HF parity

def _hf_tiny_config(transformers):
    """A tiny V4 with every path active (sliding, CSA with top-k < visible, HCA, hash, clamp)."""
    return transformers.DeepseekV4Config(
        vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, q_lora_rank=32,
        partial_rotary_factor=0.25, num_experts_per_tok=2, n_routed_experts=8,
        n_shared_experts=1, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5,
        max_position_embeddings=1048576, rope_theta=1e4, compress_rope_theta=1.6e5,
        rope_parameters={"rope_type": "yarn", "factor": 16.0,
                         "original_max_position_embeddings": 65536, "beta_fast": 32,
                         "beta_slow": 1},
        layer_types=["sliding_attention", "compressed_sparse_attention",
                     "heavily_compressed_attention", "compressed_sparse_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"], hc_mult=4,
        hc_sinkhorn_iters=20, hc_eps=1e-6, swiglu_limit=1.0, sliding_window=16, o_groups=2,
        o_lora_rank=16, index_n_heads=16, index_head_dim=16, index_topk=4,
        num_nextn_predict_layers=0, attn_implementation="eager")


def _randomise(torch, model):
    """Every tensor HF initialises to 0 or 1 gets random values (else they go untested)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            if name.endswith("tid2eid"):
                rows = torch.rand(p.shape[0], model.config.n_routed_experts, generator=gen)
                p.copy_(torch.argsort(rows, -1)[:, :p.shape[1]])
            elif "norm" in name or name.endswith("scale"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("sinks", "position_bias", "base", "e_score_correction_bias")):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


# In-memory (block-relative) name -> DeepSeek's original name (docs/deepseek_v3_v4.md,
# "Checkpoint names and formats").
_ORIGINAL = {
    "self_attn.q_a_proj.weight": "attn.wq_a.weight", "self_attn.q_a_norm.weight":
    "attn.q_norm.weight", "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_proj.weight": "attn.wkv.weight", "self_attn.kv_norm.weight":
    "attn.kv_norm.weight", "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight", "self_attn.sinks": "attn.attn_sink",
    "self_attn.compressor.kv_proj.weight": "attn.compressor.wkv.weight",
    "self_attn.compressor.gate_proj.weight": "attn.compressor.wgate.weight",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.kv_norm.weight": "attn.compressor.norm.weight",
    "self_attn.compressor.indexer.kv_proj.weight": "attn.indexer.compressor.wkv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "attn.indexer.compressor.wgate.weight",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "self_attn.compressor.indexer.kv_norm.weight": "attn.indexer.compressor.norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight":
    "attn.indexer.weights_proj.weight",
    "mlp.gate.weight": "ffn.gate.weight", "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "attn_hc.fn": "hc_attn_fn", "attn_hc.base": "hc_attn_base", "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn", "ffn_hc.base": "hc_ffn_base", "ffn_hc.scale": "hc_ffn_scale",
}
_ORIGINAL_TOP = {
    "model.embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight",
    "model.norm.weight": "norm.weight", "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base", "model.hc_head.hc_scale": "hc_head_scale",
}
_FP8 = ("wq_a", "wq_b", "wkv", "wo_a", "wo_b", "shared_experts")
FP4_VALUES = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6],
                      np.float32)


def _quant_fp8(w):
    """e4m3 + e8m0 128x128 block scales; returns (q, raw scale bytes, dequantised)."""
    import ml_dtypes
    rows, cols = -(-w.shape[0] // 128), -(-w.shape[1] // 128)
    exp = np.zeros((rows, cols), np.int32)
    for i in range(rows):
        for j in range(cols):
            amax = np.abs(w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]).max()
            exp[i, j] = int(np.ceil(np.log2(amax / 448.0)))
    full = np.repeat(np.repeat(exp, 128, 0), 128, 1)[:w.shape[0], :w.shape[1]]
    q = (w / np.exp2(full)).astype(ml_dtypes.float8_e4m3fn)
    return q, (exp + 127).astype(np.uint8), q.astype(np.float32) * np.exp2(full)


def _quant_fp4(w):
    """e2m1 pairs packed in int8 (low nibble = even column) + e8m0 scale per 32 columns."""
    exp = np.ceil(np.log2(np.abs(w.reshape(w.shape[0], -1, 32)).max(-1) / 6.0)).astype(int)
    full = np.repeat(exp, 32, 1)
    codes = np.abs((w / np.exp2(full))[..., None] - FP4_VALUES).argmin(-1).astype(np.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(np.int8)
    return packed, (exp + 127).astype(np.uint8), FP4_VALUES[codes] * np.exp2(full)


def _original_checkpoint(state):
    """HF in-memory fp32 state -> (original-named, FP8/FP4-quantised tensors, the
    dequantised in-memory state that HF must see)."""
    out, deq = {}, dict(state)
    for name, w in state.items():
        if name in _ORIGINAL_TOP:
            out[_ORIGINAL_TOP[name]] = w
            continue
        layer, rel = name[len("model.layers."):].split(".", 1)
        prefix = f"layers.{layer}."
        if rel == "mlp.experts.gate_up_proj":
            half = w.shape[1] // 2
            gate_up = []
            for e in range(w.shape[0]):
                for which, part in (("w1", w[e, :half]), ("w3", w[e, half:])):
                    q, s, d = _quant_fp4(part)
                    out[f"{prefix}ffn.experts.{e}.{which}.weight"] = q
                    out[f"{prefix}ffn.experts.{e}.{which}.scale"] = s
                    gate_up.append(d)
            deq[name] = np.stack(gate_up).reshape(w.shape)
        elif rel == "mlp.experts.down_proj":
            downs = []
            for e in range(w.shape[0]):
                q, s, d = _quant_fp4(w[e])
                out[f"{prefix}ffn.experts.{e}.w2.weight"] = q
                out[f"{prefix}ffn.experts.{e}.w2.scale"] = s
                downs.append(d)
            deq[name] = np.stack(downs)
        else:
            original = prefix + _ORIGINAL[rel]
            if any(f".{k}." in original for k in _FP8) and w.ndim == 2:
                q, s, deq[name] = _quant_fp8(w)
                out[original], out[original[:-len("weight")] + "scale"] = q, s
            else:
                out[original] = w
    return out, deq


@pytest.mark.hf
def test_hf_parity_tiny_all_paths(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV4ForCausalLM"):
        pytest.skip("this transformers has no DeepSeek-V4")
    from moejax.interop import hf_v4
    from moejax.model.v4.compressed import entry_visibility
    from moejax.model.v4.indexer import selection_gap
    from moejax.model.v4.model import TransformerV4

    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(_hf_tiny_config(transformers)).eval()
    model.set_experts_implementation("eager")
    _randomise(torch, model)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg = hf_v4.v4_config_from_hf(model.config)
    variables = hf_v4.import_tensors(state, cfg)
    apply = jax.jit(lambda v, t: TransformerV4(cfg).apply(v, t, capture_intermediates=True))
    tokens = jnp.asarray(ids.numpy())
    (logits, _), inter = apply(variables, tokens)
    diff = float(np.abs(np.asarray(logits) - ref).max())
    print(f"\nV4 tiny (fp32): max |logits - HF| = {diff:.3g}")
    assert diff <= 1e-4 and np.abs(ref).max() > 1.0

    # The CSA indexers really select (more visible entries than top-k) and no tie decides.
    for layer in ("layers_1", "layers_3"):
        node = inter["intermediates"]["layers"][layer]["attention"]["indexer"]
        _, scores = node["__call__"][0]
        visible = jnp.broadcast_to(entry_visibility(64, scores.shape[-1], 4)[None], scores.shape)
        assert int(visible.sum(-1).max()) > cfg.attention.index_topk
        gap = float(selection_gap(scores, visible, cfg.attention.index_topk))
        assert gap > 1e-4, f"{layer}: an indexer tie would decide the selection ({gap})"

    # save_pretrained's hybrid names load into the same variables.
    model.save_pretrained(tmp_path)
    loaded_cfg, loaded = hf_v4.load(tmp_path)
    assert loaded_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)

    # DeepSeek's original names with FP8 / FP4 weights: HF sees the dequantised values.
    original, dequantised = _original_checkpoint(state)
    assert any(v.dtype == np.int8 for v in original.values())
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in dequantised.items()})
    with torch.no_grad():
        ref_q = model(ids).logits.numpy()
    (logits_q, _), _ = apply(hf_v4.import_tensors(original, cfg), tokens)
    diff_q = float(np.abs(np.asarray(logits_q) - ref_q).max())
    print(f"V4 tiny, original names + FP8/FP4 weights: max |logits - HF| = {diff_q:.3g}")
    assert diff_q <= 1e-4


# ----------------------------------------------------------------------------- Muon


def test_muon_adamw_labels_of_a_v4_model():
    from moejax.interop.hf_v4 import abstract_variables
    from moejax.train.muon import param_labels
    labels = param_labels(abstract_variables(V4Config())["params"])
    flat = {"/".join(str(k.key) for k in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(labels)}
    adamw = {k for k, v in flat.items() if v == "adamw"}
    assert {"embed/embedding", "head/kernel", "final_norm/scale", "hc_head/base",
            "hc_head/scale", "layers/layers_0/attn_hc/base", "layers/layers_0/attn_hc/scale",
            "layers/layers_0/attention/sinks", "layers/layers_1/attention/compressor/position_bias",
            "layers/layers_1/attention/kv_norm/scale"} <= adamw
    for name in ("layers/layers_0/attn_hc/fn", "layers/layers_0/moe/gate",
                 "layers/layers_0/moe/router/kernel", "layers/layers_1/attention/q_b",
                 "layers/layers_1/attention/o_a", "layers/layers_1/attention/indexer/q_b",
                 "layers/layers_0/moe/shared/down", "hc_head/fn"):
        assert flat[name] == "muon", name
    assert all(v in ("muon", "adamw") for v in flat.values())


def test_muon_orthogonalises_each_expert_on_its_own():
    from moejax.train.muon import muon_adamw
    params = {"moe": {"gate": jnp.zeros((4, 32, 8))}, "embed": {"embedding": jnp.zeros((8, 32))},
              "attention": {"q_b": jnp.zeros((8, 2, 16))}, "norm": {"scale": jnp.ones(32)}}
    tx = muon_adamw(params, 1.0, weight_decay=0.0, consistent_rms=None, nesterov=False,
                    beta=0.0)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)

    @jax.jit
    def step(g):
        return tx.update(g, tx.init(params), params)[0]

    upd = step(grads)
    sv = np.linalg.svd(-np.asarray(upd["moe"]["gate"]), compute_uv=False)  # [E, 8]
    assert sv.shape == (4, 8) and 0.5 < sv.min() and sv.max() < 1.3  # each slice ~orthogonal
    # Per expert: scaling one expert's gradient leaves the other experts' updates alone.
    big = jax.tree.map(lambda x: x, grads)
    big["moe"]["gate"] = grads["moe"]["gate"].at[0].multiply(1000.0)
    upd2 = step(big)
    np.testing.assert_allclose(upd2["moe"]["gate"][1:], upd["moe"]["gate"][1:], atol=1e-5)
    # q_b [in, H, K] is one [in, H*K] matrix (width scaling sqrt(32 / 8) = 2).
    sv_q = np.linalg.svd(-np.asarray(upd["attention"]["q_b"]).reshape(8, 32),
                         compute_uv=False) / 2
    assert 0.5 < sv_q.min() and sv_q.max() < 1.3
    # AdamW leaves: first Adam step is -lr * sign(g) (up to eps).
    np.testing.assert_allclose(upd["embed"]["embedding"],
                               -np.sign(grads["embed"]["embedding"]), atol=1e-3)


# ----------------------------------------------------------------------------- decoding


def _randomise_variables(variables, seed=0):
    """Random values for every variable, incl. those initialised to 0 / 1, and tables."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
    rng = np.random.default_rng(seed)
    out = []
    for path, x in leaves:
        name = str(path[-1].key)
        if x.dtype == jnp.int32:  # tid2eid: distinct experts per token
            rows = rng.random((*x.shape[:-1], 8))
            out.append(np.argsort(rows, -1)[..., :x.shape[-1]].astype(np.int32))
        elif name == "scale":
            out.append(1 + 0.2 * rng.normal(size=x.shape))
        elif name in ("sinks", "position_bias", "base", "bias", "mtp_bias"):
            out.append(0.5 * rng.normal(size=x.shape))
        else:
            out.append(0.1 * rng.normal(size=x.shape))
    return jax.tree_util.tree_unflatten(tree, [np.asarray(o, x.dtype) for o, (_, x)
                                               in zip(out, leaves)])


def test_cached_decoding_equals_the_full_forward():
    """Prefill 37 tokens (not window-aligned), then 1 token at a time (docs/deepseek_v3_v4.md,
    "V4 incremental decoding")."""
    from moejax.interop.hf_v4 import abstract_variables
    from moejax.model.v4.model import TransformerV4
    cfg = V4Config(num_layers=2, max_seq_len=48, attention=dataclasses.replace(
        V4Config().attention, layer_types=("csa", "hca")), moe=dataclasses.replace(
        V4Config().moe, num_hash_layers=1))
    variables = _randomise_variables(abstract_variables(cfg))
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 48)),
                         jnp.int32)
    full, _ = jax.jit(TransformerV4(cfg).apply)(variables, tokens)
    model = TransformerV4(cfg, decode=True)

    @jax.jit
    def step(cache, chunk, start):
        pos = start + jnp.broadcast_to(jnp.arange(chunk.shape[1]), chunk.shape)
        (logits, _), mutated = model.apply(dict(variables, **cache), chunk, positions=pos,
                                           mutable=["cache"])
        return logits, mutated

    logits, cache = step({}, tokens[:, :37], 0)
    outs = [logits]
    for i in range(37, 48):
        logits, cache = step(cache, tokens[:, i:i + 1], i)
        outs.append(logits)
    diff = float(jnp.abs(jnp.concatenate(outs, 1) - full).max())
    print(f"\ncached decode vs full forward: max |dlogits| = {diff:.3g}")
    assert diff < 1e-4


@pytest.mark.slow  # ~40 s: compiles the V4 gradient twice
def test_scanned_layers_equal_unrolled_and_train():
    """Runs of repeated layer kinds are scanned; same numbers; gradients finite."""
    from moejax.config import load_config_file
    from moejax.interop.hf_v4 import abstract_variables
    from moejax.model.v4.model import TransformerV4, layer_segments, relayout
    flash = v4_config(load_config_file("configs/deepseek_v4.py:flash").model)
    assert [(s.start, len(s.kinds), s.repeats) for s in layer_segments(flash)] == [
        (0, 1, 2), (2, 1, 1), (3, 2, 20)]  # 2 SWA-hash, 1 CSA-hash, 20 x (HCA, CSA)
    base = V4Config()
    cfg = dataclasses.replace(base, num_layers=2, attention=dataclasses.replace(
        base.attention, layer_types=("csa", "csa")))  # both hash-routed
    scanned = dataclasses.replace(cfg, scan_layers=True, remat_policy="full")
    assert [(s.start, s.repeats, s.scanned) for s in layer_segments(scanned)] == [(0, 2, True)]
    variables = _randomise_variables(abstract_variables(cfg))
    stacked = relayout(variables, cfg, scanned)
    assert stacked["hash_routing"]["layers"]["stack_0"]["block_0"]["moe"]["router"][
        "tid2eid"].shape == (2, cfg.vocab_size, 2)
    jax.tree.map(np.testing.assert_array_equal, relayout(stacked, scanned, cfg), variables)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32)), jnp.int32)
    ref, ref_aux = jax.jit(TransformerV4(cfg).apply)(variables, tokens)

    def loss(params):
        logits, aux = TransformerV4(scanned).apply(dict(stacked, params=params), tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + aux["moe_loss"], (logits, aux)

    grads, (logits, aux) = jax.jit(jax.grad(loss, has_aux=True))(stacked["params"])
    np.testing.assert_allclose(logits, ref, atol=1e-5)
    np.testing.assert_allclose(aux["expert_load"], ref_aux["expert_load"], atol=1e-6)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert all(bool(jnp.isfinite(g).all()) for _, g in leaves)
    zero = {"/".join(str(k.key) for k in p) for p, g in leaves if not bool(jnp.any(g != 0))}
    assert zero and all("/indexer/" in name for name in zero)  # top-k blocks its gradient


def test_mtp_block_and_its_checkpoint_names():
    from moejax.interop import hf_v4
    from moejax.model.v4.model import TransformerV4
    from moejax.config.v4 import V4MTPConfig
    cfg = dataclasses.replace(V4Config(), mtp=V4MTPConfig(depth=1))
    variables = hf_v4.abstract_variables(cfg)
    assert variables["moe_bias"]["mtp_bias"].shape == (1, 8)
    tokens = jax.ShapeDtypeStruct((2, 32), jnp.int32)
    logits, aux = jax.eval_shape(
        lambda v, t: TransformerV4(cfg).apply(v, t, with_mtp=True), variables, tokens)
    assert logits.shape == aux["mtp_logits"].shape == (2, 32, 256)
    assert aux["mtp_expert_load"].shape == (1, 8)
    _, no_mtp = jax.eval_shape(lambda v, t: TransformerV4(cfg).apply(v, t), variables, tokens)
    assert "mtp_logits" not in no_mtp
    w = np.zeros((64, 64), np.float32)
    for name, path, index in [
            ("mtp.0.e_proj.weight", ("params", "mtp", "e_proj"), ()),
            ("mtp.0.norm.weight", ("params", "mtp", "norm", "scale"), ()),
            ("mtp.0.hc_head_fn", ("params", "mtp", "hc_head", "fn"), ()),
            ("mtp.0.attn.wq_a.weight", ("params", "mtp", "block", "attention", "q_a"), ()),
            ("mtp.0.attn.kv_norm.weight", ("params", "mtp", "block", "attention", "kv_norm",
                                           "scale"), ()),
            ("mtp.0.ffn.gate.bias", ("moe_bias", "mtp_bias"), (0,)),
            ("layers.3.attn.compressor.norm.weight", ("params", "layers", "layers_3",
                                                      "attention", "compressor", "kv_norm",
                                                      "scale"), ()),
            ("model.layers.1.attn.norm.weight", ("params", "layers", "layers_1", "attention",
                                                 "kv_norm", "scale"), ()),
            ("layers.2.ffn.experts.5.w3.weight", ("params", "layers", "layers_2", "moe", "up"),
             (5,))]:
        (got_path, got_index, _), = hf_v4.tensor_writes(name, w, cfg)
        assert (got_path, got_index) == (path, index), name


def test_published_flash_config_json_matches_configs_deepseek_v4():
    """The legacy keys of the released config.json give configs/deepseek_v4.py."""
    from moejax.config import load_config_file
    from moejax.interop.hf_v4 import v4_config_from_hf
    published = {
        "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43,
        "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512,
        "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024,
        "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
        "num_experts_per_tok": 6, "scoring_func": "sqrtsoftplus", "norm_topk_prob": True,
        "routed_scaling_factor": 1.5, "num_hash_layers": 3, "swiglu_limit": 10.0,
        "sliding_window": 128, "compress_ratios": [0, 0] + [4, 128] * 20 + [4] + [0],
        "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "hc_mult": 4,
        "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rope_theta": 10000,
        "compress_rope_theta": 160000, "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings":
                         65536, "beta_fast": 32, "beta_slow": 1},
        "max_position_embeddings": 1048576}
    got = v4_config_from_hf(published)
    want = v4_config(load_config_file("configs/deepseek_v4.py:flash").model)
    # query_tile is how moejax runs the attention (memory), not part of the published model
    assert got.attention == dataclasses.replace(want.attention, query_tile=0)
    assert got.hc == want.hc and got.mtp.depth == 1
    keep = ("dispatch", "capacity_factor", "balance_loss_coef", "z_loss_coef",
            "bias_update_rate", "group_size")
    assert got.moe == dataclasses.replace(want.moe, **{k: getattr(got.moe, k) for k in keep})


def test_packed_documents_do_not_see_each_other():
    """Two documents packed in one row (each a multiple of every rate long) = run alone."""
    from moejax.interop.hf_v4 import abstract_variables
    from moejax.model.v4.model import TransformerV4
    cfg = V4Config(num_layers=2, attention=dataclasses.replace(
        V4Config().attention, layer_types=("csa", "hca")), moe=dataclasses.replace(
        V4Config().moe, num_hash_layers=1))
    variables = _randomise_variables(abstract_variables(cfg), seed=1)
    docs = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 32)).astype(np.int32)
    apply = jax.jit(TransformerV4(cfg).apply)
    alone, _ = apply(variables, jnp.asarray(docs))
    packed, _ = apply(variables, jnp.asarray(docs.reshape(1, 64)),
                      jnp.repeat(jnp.array([[1, 2]]), 32, axis=1),
                      jnp.tile(jnp.arange(32), 2)[None])
    np.testing.assert_allclose(packed.reshape(2, 32, -1), alone, atol=2e-5)


def test_plan_cli_json_for_a_v3_style_transformer(capsys):
    import json

    from moejax.plan import KEYS, main
    assert main(["--config", "configs/tiny.py", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert tuple(out) == KEYS and out["mtp_params"] == 0
    assert 0 < out["active_params"] < out["total_params"]


def _window_attention_inputs(seed: int) -> tuple[jax.Array, ...]:
    """q [2, 48, 3, 8], kv [2, 48, 8], 6 entries with a random mask, sinks [3], and segment
    ids with boundaries at block edges (W = 8) and one inside a block."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(2, 48, 3, 8)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(2, 48, 8)), jnp.float32)
    entries = jnp.asarray(rng.normal(size=(2, 6, 8)), jnp.float32)
    entry_mask = jnp.asarray(rng.random((2, 48, 6)) < 0.5)
    sinks = jnp.asarray(rng.normal(size=3), jnp.float32)
    seg = jnp.asarray(np.repeat([[1, 2, 3], [1, 1, 2]], 16, axis=1), jnp.int32)
    return q, kv, entries, entry_mask, sinks, seg.at[0, 20].set(2)


def test_banded_window_attention_equals_the_dense_reference():
    from moejax.model.v4.compressed import banded_sink_attention, sink_attention, window_mask
    q, kv, entries, entry_mask, sinks, seg = _window_attention_inputs(0)

    @jax.jit
    def both(q, kv):
        dense = sink_attention(q, kv, window_mask(seg, 8), sinks, 0.3, entries, entry_mask)
        return dense, banded_sink_attention(q, kv, seg, 8, sinks, 0.3, entries, entry_mask)

    dense, banded = both(q, kv)
    np.testing.assert_allclose(banded, dense, atol=1e-5)


@pytest.mark.parametrize("query_tile", [0, 16, 24])  # whole, 2 blocks a tile, 3 blocks a tile
def test_query_tiles_and_bf16_match_the_dense_reference_in_values_and_grads(query_tile):
    """Tiled banded attention (48 queries, W = 8) against the dense fp32 reference: fp32
    to rounding; bf16 inputs to bf16 precision (on XLA:CPU the products run in fp32; on
    TPU/GPU they take bf16 with fp32 accumulation). The entry probabilities (the indexer's
    target) too."""
    from moejax.model.v4.compressed import banded_sink_attention, sink_attention, window_mask
    q, kv, entries, entry_mask, sinks, seg = _window_attention_inputs(1)

    def loss(fn, dtype):
        def f(q, kv, e):
            out, probs = fn(q.astype(dtype), kv.astype(dtype), e.astype(dtype))
            return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(probs ** 2), (out, probs)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, kv, entries)

    dense = lambda q, kv, e: sink_attention(q, kv, window_mask(seg, 8), sinks, 0.3, e,  # noqa: E731
                                            entry_mask, entry_probs=True)
    tiled = lambda q, kv, e: banded_sink_attention(q, kv, seg, 8, sinks, 0.3, e,  # noqa: E731
                                                   entry_mask, True, query_tile)
    (_, (ref_out, ref_probs)), ref_grads = loss(dense, jnp.float32)
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
        (_, (out, probs)), grads = loss(tiled, dtype)
        np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=tol, rtol=tol)
        np.testing.assert_allclose(probs, ref_probs, atol=tol, rtol=tol)
        for got, want in zip(grads, ref_grads):
            np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5 * tol,
                                       rtol=5 * tol)
