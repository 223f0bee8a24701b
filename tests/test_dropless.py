"""Dropless dispatch and the grouped matmul against the dense oracle (values and grads)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import moejax
from moejax.config import MoEConfig
from moejax.model.moe.dropless import dropless_dispatch, expert_backend, sort_pairs
from moejax.model.moe.capacity import DISPATCH
from moejax.model.moe.cpu.grouped_ffn import grouped_swiglu
from moejax.model.moe.grouped_matmul import default_backend, grouped_matmul
from moejax.model.layers import clamped_swiglu
from moejax.model.moe.layer import MoE
from moejax.model.moe.router import select_experts
from moejax.sharding import param_shardings

G, S, D, E, F, T = 2, 16, 8, 4, 6, 2
# (backend, largest/smallest row window of the loop backend, swiglu limit); windows 8/2 give
# full windows, windows of 4 and 2 rows for the remainder and a last masked one.
# "bulk" has no windows to choose (its overflow loop keeps its own; test_bulk_dropless.py).
CASES = [("loop", (8, 2), 0.5), ("loop", (512, 16), 0.0), ("ragged_dot", (0, 0), 0.5),
         ("bulk", (0, 0), 0.5), ("bulk", (0, 0), 0.0)]


def _problem(seed: int = 0, mask_last: int = 3, one_expert: bool = False):
    k = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(k[0], (G, S, D))
    scores = jax.nn.softmax(jax.random.normal(k[1], (G, S, E)), -1)
    idx, w = select_experts(scores, jnp.zeros(E), T)
    if one_expert:  # every token's first choice is expert 2, second choice expert 0
        idx = jnp.broadcast_to(jnp.asarray([2, 0], jnp.int32), idx.shape)
    weights = tuple(jax.random.normal(k[i], shape) * 0.3 for i, shape in
                    zip(range(2, 5), [(E, D, F), (E, D, F), (E, F, D)]))
    mask = jnp.ones((G, S), bool).at[:, S - mask_last:].set(False)
    return x, idx, w, mask, weights


def _value_and_grads(fn, x, idx, w, mask, weights, limit):
    def loss(x, w, weights):
        out, dropped = fn(x, idx, w, mask, weights, 1.0, limit)
        return jnp.sum(out * jnp.cos(out)), (out, dropped)
    (_, (out, dropped)), grads = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, w, weights)
    return out, dropped, grads


@functools.lru_cache
def _oracle(seed: int, one_expert: bool, limit: float):
    x, idx, w, mask, weights = _problem(seed, one_expert=one_expert)
    return _value_and_grads(DISPATCH["dense"], x, idx, w, mask, weights, limit)


def _assert_matches_oracle(fn, seed=0, one_expert=False, limit=0.0):
    x, idx, w, mask, weights = _problem(seed, one_expert=one_expert)
    ref, _, ref_g = _oracle(seed, one_expert, limit)
    out, dropped, g = _value_and_grads(fn, x, idx, w, mask, weights, limit)
    assert int(dropped) == 0
    assert float(jnp.abs(ref).max()) > 0.05  # not a comparison between zeros
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):  # dx, dw, dgate/up/down
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_array_equal(out[:, S - 3:], 0.0)  # padding tokens get nothing
    np.testing.assert_array_equal(g[0][:, S - 3:], 0.0)


@pytest.mark.parametrize("backend,windows,limit", CASES)
def test_values_and_grads_equal_the_oracle(backend, windows, limit):
    fn = functools.partial(dropless_dispatch, backend=backend, block=windows[0],
                           min_rows=windows[1])
    _assert_matches_oracle(fn, limit=limit)


@pytest.mark.parametrize("backend,windows,limit", CASES)
def test_all_tokens_to_one_expert_drop_nothing(backend, windows, limit):
    fn = functools.partial(dropless_dispatch, backend=backend, block=windows[0],
                           min_rows=windows[1])
    _assert_matches_oracle(fn, seed=1, one_expert=True, limit=limit)


def test_limit_clamps_something():
    x, idx, w, mask, weights = _problem()
    plain = DISPATCH["dense"](x, idx, w, mask, weights, 1.0, 0.0)[0]
    clamped = DISPATCH["dense"](x, idx, w, mask, weights, 1.0, 0.5)[0]
    assert float(jnp.abs(plain - clamped).max()) > 1e-3  # the limit test is not vacuous


@pytest.mark.parametrize("backend", ["loop", "ragged_dot"])
def test_grouped_matmul_segments_and_empty_groups(backend):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(23, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32)
    sizes = jnp.asarray([6, 0, 11, 3], jnp.int32)  # rows 20..22 belong to no group
    y = grouped_matmul(x, w, sizes, backend, block=8, min_rows=2)
    group = np.repeat([0, 1, 2, 3], [6, 0, 11, 3])
    np.testing.assert_allclose(y[:20], np.einsum("mk,mkn->mn", x[:20], w[group]), atol=1e-5)
    np.testing.assert_array_equal(y[20:], 0.0)


def test_loop_windows_cover_a_block_that_is_not_a_power_of_two_times_min_rows():
    """block 300 / min_rows 32: halving 300 gives windows 150, 75, 37 and leaves up to 36
    rows for the last 32-row window; the ladder is 256, 128, 64, 32 instead."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(300, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
    y = grouped_matmul(x, w, jnp.asarray([299, 1], jnp.int32), "loop", block=300,
                       min_rows=32)
    np.testing.assert_allclose(y[:299], x[:299] @ w[0], atol=1e-5)
    np.testing.assert_allclose(y[299:], x[299:] @ w[1], atol=1e-5)


@pytest.mark.parametrize("limit", [0.0, 0.5])
def test_fused_grouped_swiglu_equals_three_grouped_matmuls(limit):
    """grouped_ffn (the CPU path) against gmm(swiglu(gmm, gmm), gmm) with ragged_dot:
    empty experts, a remainder that needs the masked window, rows past sum(sizes)."""
    rng = np.random.default_rng(1)
    sizes = jnp.asarray([7, 0, 19, 1, 30], jnp.int32)  # 57 routed rows of 64
    x = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
    gate, up = (jnp.asarray(rng.normal(size=(5, 16, 12)) * 0.3, jnp.float32) for _ in "gu")
    down = jnp.asarray(rng.normal(size=(5, 12, 16)) * 0.3, jnp.float32)
    probe = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)

    def three(x, gate, up, down):
        gmm = functools.partial(grouped_matmul, sizes=sizes, backend="ragged_dot")
        return gmm(clamped_swiglu(gmm(x, gate), gmm(x, up), limit), down)

    def fused(x, gate, up, down):
        return grouped_swiglu(x, gate, up, down, sizes, limit, block=8, min_rows=2)

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(fn(*a)) * probe),
                                          argnums=(0, 1, 2, 3)))(x, gate, up, down)

    (want, want_g), (got, got_g) = loss(three), loss(fused)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(got_g, want_g):
        np.testing.assert_allclose(a, b, atol=2e-5)
    np.testing.assert_array_equal(fused(x, gate, up, down)[57:], 0.0)
    np.testing.assert_array_equal(got_g[0][57:], 0.0)


def test_sort_pairs_groups_by_expert_and_puts_padding_last():
    idx = jnp.asarray([[[1, 0], [1, 2], [0, 1]]], jnp.int32)  # pairs 0..5 token-major
    mask = jnp.asarray([[True, False, True]])
    order, inverse, sizes = sort_pairs(idx, mask, 3)
    np.testing.assert_array_equal(sizes, [2, 2, 0])
    np.testing.assert_array_equal(order, [1, 4, 0, 5, 2, 3])  # e0: 1,4; e1: 0,5; pad: 2,3
    np.testing.assert_array_equal(inverse[order], np.arange(6))


def test_backend_follows_the_platform():
    assert default_backend("cpu") == "loop"
    assert default_backend("gpu") == default_backend("tpu") == "ragged_dot"
    assert expert_backend("cpu") == "bulk"
    assert expert_backend("gpu") == expert_backend("tpu") == "ragged_dot"


def _moe_loss(module, bias, mask):
    def loss(params, x):
        y, _ = module.apply(params, x, bias, mask)
        return jnp.sum(y * jnp.sin(y)), y
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def test_moe_module_dropless_equals_dense_sharded_and_not():
    cfg = MoEConfig(num_experts=8, top_k=2, expert_hidden=8, num_shared_experts=1,
                    dispatch="dense", group_size=16)
    x = jax.random.normal(jax.random.key(3), (8, 8, D))
    bias, mask = jnp.zeros(8), jnp.ones((8, 8), bool).at[1, 5:].set(False)
    params = jax.jit(MoE(cfg).init)(jax.random.key(4), x, bias, mask)
    (_, ref), ref_g = jax.jit(_moe_loss(MoE(cfg), bias, mask))(params, x)
    dropless = MoE(dataclasses.replace(cfg, dispatch="dropless"))
    (_, out), g = jax.jit(_moe_loss(dropless, bias, mask))(params, x)
    mesh = moejax.make_mesh(moejax.MeshConfig(data=2, expert=4))
    with moejax.use_mesh(mesh):
        sharded = jax.device_put(params, param_shardings(params, mesh))
        xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "expert"))))
        (_, out_s), g_s = jax.jit(_moe_loss(dropless, bias, mask))(sharded, xs)
    for got, grads in [(out, g), (out_s, g_s)]:
        np.testing.assert_allclose(got, ref, atol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_g)):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_v4_moe_dropless_equals_dense_with_the_clamp():
    from moejax.config.v4 import V4MoEConfig
    from moejax.model.v4.moe import V4MoE
    cfg = V4MoEConfig(num_experts=8, top_k=2, expert_hidden=8, swiglu_limit=0.5,
                      dispatch="dense")
    x = jax.random.normal(jax.random.key(5), (2, 8, D))
    tokens = jnp.zeros((2, 8), jnp.int32)
    bias, mask = jnp.zeros(8), jnp.ones((2, 8), bool).at[0, 6:].set(False)
    init = jax.jit(V4MoE(cfg, False, 32, 0.5).init)
    params = init(jax.random.key(6), x, bias, tokens, mask)
    outs = [jax.jit(V4MoE(dataclasses.replace(cfg, dispatch=name), False, 32, 0.5).apply)(
        params, x, bias, tokens, mask)[0] for name in ("dense", "dropless")]
    assert float(jnp.abs(outs[0]).max()) > 0.01
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


def test_config_accepts_dropless():
    from conftest import small_config
    cfg = small_config("model.moe.dispatch='dropless'")
    assert cfg.model.moe.dispatch == "dropless"
