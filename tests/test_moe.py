"""Dispatch strategies against the dense oracle, capacity dropping, and the router."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.model.moe.capacity import DISPATCH, capacity, slot_positions_sorted
from moejax.model.moe.router import (Routing, expert_load, select_experts,
                                 sequence_balance_loss, update_balance_bias)

G, S, D, E, F, T = 2, 16, 8, 4, 6, 2


def _problem(seed: int = 0, mask_last: int = 0):
    k = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(k[0], (G, S, D))
    scores = jax.nn.softmax(jax.random.normal(k[1], (G, S, E)), -1)
    idx, w = select_experts(scores, jnp.zeros(E), T)
    weights = tuple(jax.random.normal(k[i], shape) * 0.3 for i, shape in
                    zip(range(2, 5), [(E, D, F), (E, D, F), (E, F, D)]))
    mask = jnp.ones((G, S), bool)
    if mask_last:
        mask = mask.at[:, -mask_last:].set(False)
    return x, idx, w, mask, weights


def _swiglu(x, gate, up, down):
    return (jax.nn.silu(x @ gate) * (x @ up)) @ down


@pytest.mark.parametrize("name", ["index", "einsum"])
def test_dispatch_matches_dense_oracle_values_and_grads(name):
    x, idx, w, mask, weights = _problem(mask_last=3)

    def loss(fn, x, w, weights):
        out, dropped = fn(x, idx, w, mask, weights, capacity_factor=0.0)
        return jnp.sum(out * jnp.cos(out)), (out, dropped)

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True),
                             static_argnums=0)  # one program each, not op by op
    (_, (ref, _)), ref_g = value_and_grad(DISPATCH["dense"], x, w, weights)
    (_, (out, dropped)), g = value_and_grad(DISPATCH[name], x, w, weights)
    assert int(dropped) == 0
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert float(jnp.abs(ref).max()) > 0.1  # the comparison is not between zeros
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_array_equal(out[:, -3:], 0.0)  # padding tokens get nothing


@pytest.mark.parametrize("name", ["index", "einsum"])
def test_capacity_drops_exactly_the_hand_built_pairs(name):
    # 3 tokens, 3 experts, top-2, capacity 1 (cf=0.5: ceil(0.5*3*2/3) = 1).
    # Choice-major priority: first choices t0->e0 (kept), t1->e0 (dropped), t2->e1 (kept);
    # second choices t0->e1 (dropped: e1 full), t1->e2 (kept), t2->e0 (dropped).
    assert capacity(3, 2, 3, 0.5) == 1
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 3, D)), jnp.float32)
    idx = jnp.asarray([[[0, 1], [0, 2], [1, 0]]], jnp.int32)
    w = jnp.asarray([[[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]]], jnp.float32)
    weights = tuple(jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32)
                    for s in [(3, D, F), (3, D, F), (3, F, D)])
    out, dropped = DISPATCH[name](x, idx, w, jnp.ones((1, 3), bool), weights, 0.5)
    expert = lambda e, t: _swiglu(x[0, t], *(a[e] for a in weights))  # noqa: E731
    expected = np.stack([0.7 * expert(0, 0), 0.4 * expert(2, 1), 0.9 * expert(1, 2)])
    assert int(dropped) == 3
    np.testing.assert_allclose(out[0], expected, atol=1e-5)


def test_slot_positions_follow_queue_order_and_skip_padding():
    ids = jnp.asarray([[2, 0, 2, 4, 0, 2, 1]])  # 4 = padding (virtual expert)
    np.testing.assert_array_equal(slot_positions_sorted(ids, 4)[0], [0, 0, 1, 0, 1, 2, 0])


def test_capacity_formula():
    assert capacity(512, 6, 64, 1.25) == 60  # ceil(1.25 * 512 * 6 / 64)
    assert capacity(16, 2, 4, 0.0) == 16  # unlimited
    assert capacity(16, 2, 4, 100.0) == 16  # never above the group size


def test_select_experts_topk_renormalize_and_scale():
    scores = jnp.asarray([[0.1, 0.5, 0.3, 0.05]])
    idx, w = select_experts(scores, jnp.zeros(4), 2, renormalize=False)
    np.testing.assert_array_equal(idx, [[1, 2]])
    np.testing.assert_allclose(w, [[0.5, 0.3]], rtol=1e-6)
    idx, w = select_experts(scores, jnp.zeros(4), 2, renormalize=True, scale=2.5)
    np.testing.assert_allclose(w, [[2.5 * 0.5 / 0.8, 2.5 * 0.3 / 0.8]], rtol=1e-6)


def test_bias_changes_choice_but_not_combine_weights():
    scores = jnp.asarray([[0.1, 0.5, 0.3, 0.05]])
    bias = jnp.asarray([0.0, 0.0, 0.0, 0.4])  # expert 3: 0.45 biased, beats expert 2
    idx, w = select_experts(scores, bias, 2, renormalize=False)
    np.testing.assert_array_equal(idx, [[1, 3]])
    np.testing.assert_allclose(w, [[0.5, 0.05]], rtol=1e-6)  # unbiased scores


def test_group_limited_routing_keeps_only_the_best_groups():
    # groups {0,1} and {2,3}; group score = sum of top-2: 0.9+0.05 < 0.5+0.5.
    scores = jnp.asarray([[0.9, 0.05, 0.5, 0.5]])
    idx, _ = select_experts(scores, jnp.zeros(4), 2, num_groups=2, top_groups=1)
    np.testing.assert_array_equal(jnp.sort(idx), [[2, 3]])
    idx, _ = select_experts(scores, jnp.zeros(4), 2, num_groups=1, top_groups=1)
    np.testing.assert_array_equal(jnp.sort(idx), [[0, 2]])


def test_repeated_bias_updates_move_load_toward_uniform():
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (4096, 16))
    kernel = jax.random.normal(k2, (16, 8)) + jnp.linspace(-1.0, 1.5, 8)  # skewed router
    scores = jax.nn.sigmoid(x @ kernel + jnp.linspace(-3.0, 3.0, 8))
    mask = jnp.ones((4096,), bool)
    bias = jnp.zeros(8)

    def imbalance(bias):
        idx, _ = select_experts(scores, bias, 2)
        load = expert_load(idx, 8, mask)
        return load, float(load.max() / load.mean())

    load, start = imbalance(bias)
    for _ in range(250):
        bias = update_balance_bias(bias, load, 0.001)
        load, end = imbalance(bias)
    print(f'load max/mean: {start:.3f} -> {end:.3f}')
    assert start > 1.5, start
    assert end < 1.15, end


def test_sequence_balance_loss_is_one_when_uniform():
    # Uniform scores and perfectly spread choices: f_i = 1, P_i = 1/E, sum = 1.
    idx = jnp.asarray([[[0, 1], [2, 3], [0, 1], [2, 3]]], jnp.int32)
    scores = jnp.full((1, 4, 4), 0.25)
    routing = Routing(idx, jnp.ones((1, 4, 2)), scores, jnp.zeros((1, 4, 4)))
    np.testing.assert_allclose(sequence_balance_loss(routing, jnp.ones((1, 4))), 1.0)
    skew = Routing(jnp.zeros_like(idx).at[..., 1].set(1), jnp.ones((1, 4, 2)),
                   jnp.asarray([[[0.5, 0.5, 0.0, 0.0]] * 4]), jnp.zeros((1, 4, 4)))
    np.testing.assert_allclose(sequence_balance_loss(skew, jnp.ones((1, 4))), 2.0)
