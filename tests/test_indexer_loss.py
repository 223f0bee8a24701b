"""The lightning indexer's KL distillation loss (DSA-style) and its stop-gradients."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_v4 import _randomise_variables

from moejax.model.v4.indexer_loss import indexer_kl
from moejax.config.v4 import V4Config, v4_config


def _kl_reference(attention, scores, candidates, real):
    """float64 numpy: per row, p = attention[S] / sum, q = softmax(scores[S]), KL(p || q)."""
    total, rows = 0.0, 0
    for b, t in np.ndindex(*real.shape):
        s = candidates[b, t]
        if not (real[b, t] and s.any()):
            continue
        p = attention[b, t, s] / attention[b, t, s].sum()
        z = scores[b, t, s] - scores[b, t, s].max()
        log_q = z - np.log(np.exp(z).sum())
        total += np.sum(p * (np.log(p) - log_q))
        rows += 1
    return total / max(rows, 1)


def test_indexer_kl_matches_the_formula():
    rng = np.random.default_rng(0)
    attention = rng.random((2, 7, 5))
    scores = rng.normal(size=(2, 7, 5))
    candidates = rng.random((2, 7, 5)) < 0.6
    candidates[0, 0] = False  # a row without candidates does not count
    real = np.ones((2, 7), bool)
    real[1, 5:] = False  # padding does not count
    got = indexer_kl(jnp.asarray(attention, jnp.float32), jnp.asarray(scores, jnp.float32),
                     jnp.asarray(candidates), jnp.asarray(real))
    np.testing.assert_allclose(float(got), _kl_reference(attention, scores, candidates, real),
                               rtol=1e-5)
    # q = p gives 0; the gradient reaches the scores only.
    log_p = np.log(attention)
    same = indexer_kl(jnp.asarray(attention, jnp.float32), jnp.asarray(log_p, jnp.float32),
                      jnp.ones((2, 7, 5), bool), jnp.asarray(real))
    assert abs(float(same)) < 1e-6
    g_att, g_scores = jax.grad(indexer_kl, argnums=(0, 1))(
        jnp.asarray(attention, jnp.float32), jnp.asarray(scores, jnp.float32),
        jnp.asarray(candidates), jnp.asarray(real))
    assert not np.any(np.asarray(g_att)) and np.any(np.asarray(g_scores))
    assert np.all(np.isfinite(np.asarray(g_scores)))
    assert not np.any(np.asarray(g_scores)[~candidates])


def _small(**attention):
    """Two layers (sliding + CSA, learned routing) at L = 32: 8 entries, top-4 selects."""
    base = V4Config()
    return dataclasses.replace(base, num_layers=2, moe=dataclasses.replace(
        base.moe, num_hash_layers=0), attention=dataclasses.replace(
        base.attention, layer_types=("sliding", "csa"), **attention))


def _flat(tree):
    return {"/".join(str(k.key) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_indexer_loss_trains_only_the_indexer():
    """coef > 0: every indexer weight gets a gradient; the rest of the model's gradients
    are those of the language-model loss alone (stop_gradient holds). coef = 0: indexer
    gradients are exactly zero, as before."""
    from moejax.interop.hf_v4 import abstract_variables
    from moejax.model.v4.model import TransformerV4
    off, on = _small(), _small(indexer_loss_coef=0.5)
    variables = _randomise_variables(abstract_variables(off), seed=7)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 32)), jnp.int32)

    def loss(params, cfg):
        logits, aux = TransformerV4(cfg).apply(dict(variables, params=params), tokens)
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                                           tokens[:, 1:, None], -1))
        return ce + aux["indexer_loss"], aux

    @jax.jit
    def both_grads(params):
        grad = jax.grad(loss, has_aux=True)
        return grad(params, off), grad(params, on)

    (g_off, aux_off), (g_on, aux_on) = both_grads(variables["params"])
    assert float(aux_off["indexer_loss"]) == 0.0
    kl = np.asarray(aux_on["indexer_kl"])
    assert kl.shape == (2,) and kl[0] == 0 and kl[1] > 0
    np.testing.assert_allclose(float(aux_on["indexer_loss"]), 0.5 * kl.sum(), rtol=1e-6)

    off_flat, on_flat = _flat(g_off), _flat(g_on)
    indexer = {k for k in on_flat if "/indexer/" in k}
    assert len(indexer) == 6  # q_b, weights_proj, compressor kv / gate / position_bias / norm
    for name in indexer:
        assert not np.any(off_flat[name]), f"{name}: coef 0 must give no gradient"
        assert np.any(on_flat[name]), f"{name}: no gradient from the indexer loss"
    # The indexer loss does not leak into the model. Tolerance: the two programs round
    # float32 differently (under the tests' XLA:CPU -O0, up to 4e-8 on gradients of ~1e-3
    # was seen); a leak would be of the size of the indexer's own gradients, checked to be
    # far larger.
    atol = 1e-7
    assert max(np.abs(on_flat[name]).max() for name in indexer) > 1e3 * atol
    for name in set(on_flat) - indexer:
        np.testing.assert_allclose(on_flat[name], off_flat[name], rtol=1e-4, atol=atol,
                                   err_msg=name)


def test_warmup_attends_every_visible_entry():
    """Dense warm-up = a top-k large enough to select everything (same logits and KL)."""
    from moejax.interop.hf_v4 import abstract_variables
    from moejax.model.v4.model import TransformerV4
    warm = _small(indexer_loss_coef=1.0, indexer_warmup=True)
    wide = _small(indexer_loss_coef=1.0, index_topk=8)
    variables = _randomise_variables(abstract_variables(warm), seed=2)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 32)), jnp.int32)

    @jax.jit
    def both(v):
        return TransformerV4(warm).apply(v, tokens), TransformerV4(wide).apply(v, tokens)

    (logits_w, aux_w), (logits_k, aux_k) = both(variables)
    np.testing.assert_allclose(logits_w, logits_k, atol=1e-6)
    np.testing.assert_allclose(aux_w["indexer_kl"], aux_k["indexer_kl"], rtol=1e-5)
    assert float(aux_w["indexer_loss"]) > 0


def test_indexer_loss_coef_is_validated():
    with pytest.raises(ValueError, match="model.attention.indexer_loss_coef"):
        v4_config({"attention": {"indexer_loss_coef": -1.0}})


@pytest.mark.slow  # two V4 train-step compiles; test_indexer_loss_trains_only_the_indexer
def test_train_step_adds_the_indexer_loss_and_moves_the_indexer():  # is the default check
    """Two V4 train steps: the indexer loss is in the loss and moves the indexer; the hash
    layer's balance-bias row stays 0 while the learned layer's moves; its router entropy
    is NaN."""
    from moejax.config import load_config, resolve
    from moejax.sharding import make_mesh, use_mesh
    from moejax.train import state as train_state
    from moejax.train.step import make_train_step
    from conftest import ROOT
    cfg = resolve(load_config(str(ROOT / "configs/deepseek_v4.py") + ":tiny", [
        "model.num_layers=2", "model.attention.layer_types=('sliding','csa')",
        "model.moe.num_hash_layers=1", "model.mtp.depth=0", "model.max_seq_len=64",
        "model.attention.indexer_loss_coef=1.0", "train.batch_size=8", "train.seq_len=32",
        "optimizer.warmup_steps=1"]))
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 256, (8, 32)).astype(np.int32),
             "segment_ids": np.ones((8, 32), np.int32),
             "positions": np.tile(np.arange(32, dtype=np.int32), (8, 1))}
    mesh = make_mesh(cfg.mesh)
    with use_mesh(mesh):
        setup = train_state.make_setup(cfg, mesh)
        st = train_state.init_state(setup, jax.random.key(0))
        before = jax.device_get(st.params["layers"]["layers_1"]["attention"]["indexer"])
        step = make_train_step(setup, cfg)
        for _ in range(2):
            st, metrics = step(st, batch, jax.random.key(1))
        after = jax.device_get(st.params["layers"]["layers_1"]["attention"]["indexer"])
    m = jax.device_get(metrics)
    assert float(m["indexer_loss"]) > 0
    np.testing.assert_allclose(float(m["loss"]) - float(m["cross_entropy"]),  # + moe_loss
                               float(m["indexer_loss"]), atol=1e-3)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), after,
                                         before))
    assert min(moved) > 1e-4  # far beyond weight decay alone (~2e-5 here)
    bias = np.asarray(jax.device_get(st.moe_bias["bias"]))  # layer 0 routes by hash
    assert not bias[0].any() and bias[1].any()
    entropy = np.asarray(m["moe/router_entropy"])  # not defined on the hash layer
    assert np.isnan(entropy[0]) and 0 < entropy[1] <= np.log(cfg.model.moe.num_experts)
