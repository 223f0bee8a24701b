"""Whole-model properties: causality, segment isolation, scan/unroll and remat equivalence."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config

import moejax
from moejax.model.transformer import Transformer


def _init(cfg, tokens):
    model = Transformer(moejax.model_config(cfg.model))
    return model, nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens))


def _tokens(b=2, length=32, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, length), 0, 128)


def test_changing_token_t_changes_no_earlier_logit():
    cfg = small_config("model.moe.capacity_factor=0.0")
    tokens = _tokens()
    model, v = _init(cfg, tokens)
    apply = jax.jit(model.apply)
    base, _ = apply(v, tokens)
    t = 20
    changed, _ = apply(v, tokens.at[:, t].set((tokens[:, t] + 1) % 128))
    # Not bitwise: token t's routing moves other pairs between dropless's batched slots
    # and its overflow loop (moe/cpu/bulk_dropless.py), two matmul kernels that round differently
    # (~1e-7 here). A leak would be orders of magnitude larger (see the assert below).
    np.testing.assert_allclose(changed[:, :t], base[:, :t], rtol=0, atol=1e-6)
    assert float(jnp.abs(changed[:, t:] - base[:, t:]).max()) > 1e-4


def test_packed_documents_do_not_see_each_other():
    cfg = small_config("model.moe.capacity_factor=0.0")
    tokens = _tokens(1)
    seg = jnp.asarray([[1] * 12 + [2] * 20])
    pos = jnp.asarray([list(range(12)) + list(range(20))])
    model, v = _init(cfg, tokens)
    apply = jax.jit(model.apply)
    packed, _ = apply(v, tokens, seg, pos)
    alone, _ = apply(v, tokens[:, 12:])
    np.testing.assert_allclose(packed[:, 12:], alone, atol=2e-5)
    other = tokens.at[:, :12].set((tokens[:, :12] + 7) % 128)
    packed2, _ = apply(v, other, seg, pos)
    np.testing.assert_allclose(packed2[:, 12:], packed[:, 12:], atol=2e-5)


def _loss_and_grads(model, variables, tokens):
    probe = jax.random.normal(jax.random.key(3), (*tokens.shape, 128))

    def loss(params):
        logits, aux = model.apply({**variables, "params": params}, tokens)
        return jnp.mean(logits * probe) + aux["moe_loss"], logits
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return logits, grads


def _unstack(stacked_stack, n):
    return {f"layers_{i}": jax.tree.map(lambda a: a[i], stacked_stack["layers"])
            for i in range(n)}


@pytest.fixture(scope="module")
def scanned_grads():
    """(model, variables, logits, gradients) of the scanned small model (default dispatch),
    the baseline of the scan and remat tests, computed once."""
    tokens = _tokens()
    model, v = _init(small_config(), tokens)
    return (model, v, *_loss_and_grads(model, v, tokens))


# The default dispatch (dropless) shares the scanned baseline with the remat test; index
# and einsum are slow (the scanned index forward is also test_sharding.py's reference).
@pytest.mark.parametrize("dispatch", [pytest.param(None, id="dropless"),
                                      pytest.param("index", marks=pytest.mark.slow),
                                      pytest.param("einsum", marks=pytest.mark.slow)])
def test_scan_and_unrolled_give_same_outputs_and_gradients(dispatch, scanned_grads):
    tokens = _tokens()
    chosen = (f"model.moe.dispatch='{dispatch}'",) if dispatch else ()
    if dispatch is None:
        scan_model, v, logits_a, g_a = scanned_grads
    else:
        scan_model, v = _init(small_config(*chosen), tokens)
        logits_a, g_a = _loss_and_grads(scan_model, v, tokens)
    loop_model = Transformer(moejax.model_config(
        small_config(*chosen, "model.scan_layers=False").model))
    p = dict(v["params"])
    p["dense_stack"] = _unstack(p["dense_stack"], 1)
    p["moe_stack"] = _unstack(p["moe_stack"], 2)
    loop_vars = {**v, "params": p}
    logits_b, g_b = _loss_and_grads(loop_model, loop_vars, tokens)
    np.testing.assert_allclose(logits_a, logits_b, atol=1e-5)
    g_b["dense_stack"] = {"layers": jax.tree.map(lambda *a: jnp.stack(a),
                                                 *g_b["dense_stack"].values())}
    g_b["moe_stack"] = {"layers": jax.tree.map(lambda *a: jnp.stack(a),
                                               *g_b["moe_stack"].values())}
    for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b)):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("policy", ["dots", pytest.param("full", marks=pytest.mark.slow),
                                    pytest.param("save_moe", marks=pytest.mark.slow)])
def test_remat_gives_same_outputs_and_gradients(policy, scanned_grads):
    tokens = _tokens()
    _, v, logits_a, g_a = scanned_grads
    remat = Transformer(moejax.model_config(small_config(f"model.remat_policy='{policy}'").model))
    logits_b, g_b = _loss_and_grads(remat, v, tokens)
    np.testing.assert_allclose(logits_a, logits_b, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_aux_reports_per_layer_moe_statistics():
    tokens = _tokens()
    capacity = small_config("model.moe.dispatch='index'", "model.moe.capacity_factor=0.5")
    model, v = _init(capacity, tokens)
    _, aux = jax.jit(model.apply)(v, tokens)
    assert aux["expert_load"].shape == (2, 8)
    np.testing.assert_allclose(aux["expert_load"].sum(-1), 1.0, rtol=1e-6)
    assert aux["balance_loss"].shape == aux["z_loss"].shape == (2,)
    assert bool(jnp.all(aux["dropped_fraction"] > 0))  # capacity 0.5 must drop
    assert float(aux["moe_loss"]) > 0


# Scanned decoding is slow here: test_generate.py (greedy decoding of the scanned small
# model equals the full forward's argmax) and test_mla.py's cached decoding (scanned V3)
# run it by default.
# Both slow: test_generate's greedy decoding runs the cache against the full forward.
@pytest.mark.slow
@pytest.mark.parametrize("scan", [True, False])
def test_cached_decoding_equals_the_full_forward(scan):
    cfg = small_config("model.moe.capacity_factor=0.0", f"model.scan_layers={scan}")
    tokens = _tokens(2, 24)
    model, v = _init(cfg, tokens)
    full, _ = jax.jit(model.apply)(v, tokens)
    decoder = Transformer(moejax.model_config(cfg.model), decode=True)
    prompt = 10
    positions = jnp.broadcast_to(jnp.arange(prompt), (2, prompt))
    (logits, _), state = jax.jit(lambda v, t, p: decoder.apply(
        v, t, positions=p, mutable=["cache"]))(v, tokens[:, :prompt], positions)
    steps = [logits]
    step = jax.jit(lambda v, t, p: decoder.apply(v, t, positions=p, mutable=["cache"]))
    for t in range(prompt, tokens.shape[1]):
        (logits, _), state = step({**v, **state}, tokens[:, t:t + 1],
                                  jnp.full((2, 1), t))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5)
