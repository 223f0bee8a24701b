"""Dropless's CPU experts: capacity slots for the bulk, the token-space overflow loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.model.moe.cpu.bulk_dropless import bulk_dropless_experts, default_capacity, plan_slots
from moejax.model.moe.dropless import sort_pairs
from moejax.model.moe.capacity import dense_dispatch
from moejax.model.layers import clamped_swiglu
from moejax.model.moe.cpu.overflow_ffn import overflow_swiglu
from moejax.model.moe.router import select_experts

N, D, E, F, K = 60, 8, 5, 6, 2  # tokens, model dim, experts, expert hidden, top-k
# P = 120 pairs, C = 24: the overflow list (P - C = 96) is not a power-of-two window


def _weights(key, num_experts=E):
    k = jax.random.split(key, 3)
    return (jax.random.normal(k[0], (num_experts, D, F)) * 0.4,
            jax.random.normal(k[1], (num_experts, D, F)) * 0.4,
            jax.random.normal(k[2], (num_experts, F, D)) * 0.4)


def test_plan_puts_the_first_c_pairs_in_slots_and_lists_the_rest():
    # pairs p = 2n + t: e0 gets p0 p2 p4 p7, e1 gets p1 p5 p6, e2 gets p3
    idx = jnp.asarray([[[0, 1], [0, 2], [0, 1], [1, 0]]], jnp.int32)
    order, _, sizes = sort_pairs(idx, jnp.ones((1, 4), bool), 3)
    plan = plan_slots(order, sizes, capacity=2)
    np.testing.assert_array_equal(plan.pair_of_slot, [0, 2, 1, 5, 3, 8])  # 8 = empty
    np.testing.assert_array_equal(plan.slot_of_pair, [0, 2, 1, 4, 6, 3, 6, 6])  # 6 = none
    np.testing.assert_array_equal(plan.overflow_sizes, [2, 1, 0])
    np.testing.assert_array_equal(plan.overflow_pairs, [4, 7, 6, 8, 8, 8])


def test_default_capacity_is_the_mean_load_in_whole_simd_rows():
    assert default_capacity(24576, 64) == 384
    assert default_capacity(100, 3) == 40  # ceil(33.3) = 34 -> 40
    assert default_capacity(4, 8) == 8


def _routing(seed, skew):
    """Top-K routing of N tokens, the last 5 padding; skew > 0 piles tokens on expert 0."""
    k = jax.random.split(jax.random.key(seed), 2)
    logits = jax.random.normal(k[0], (1, N, E)) + skew * (jnp.arange(E) == 0)
    idx, w = select_experts(jax.nn.softmax(logits, -1), jnp.zeros(E), K)
    return idx, w, jnp.ones((1, N), bool).at[:, N - 5:].set(False)


@pytest.mark.parametrize("capacity", [8, None, N * K])  # most overflow / default / none
@pytest.mark.parametrize("skew,limit", [(0.0, 0.0), (4.0, 0.5)])
def test_bulk_experts_equal_the_dense_oracle(capacity, skew, limit):
    idx, w, mask = _routing(0, skew)
    x = jax.random.normal(jax.random.key(1), (1, N, D))
    weights = _weights(jax.random.key(2))
    order, _, sizes = sort_pairs(idx, mask, E)
    probe = jax.random.normal(jax.random.key(3), (1, N, D))

    def bulk(x, w, weights):
        pw = (w * mask[..., None]).reshape(-1)
        return bulk_dropless_experts(x[0], order, sizes, pw, K, weights, limit,
                                     capacity)[None]

    def dense(x, w, weights):
        return dense_dispatch(x, idx, w, mask, weights, 0.0, limit)[0]

    def run(fn):
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(fn(*a)) * probe),
                                          argnums=(0, 1, 2)))(x, w, weights)

    (want, want_g), (got, got_g) = run(dense), run(bulk)
    assert abs(float(want)) > 0.05
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(a, b, atol=2e-5)
    if capacity == 8 and skew:
        assert int(plan_slots(order, sizes, 8).overflow_sizes.sum()) > 20  # loop exercised


def test_overflow_loop_equals_a_per_pair_sum():
    """Empty experts, windows of 4/2 rows plus a masked one, sentinels past the lists."""
    rng = np.random.default_rng(0)
    sizes = np.asarray([7, 0, 11, 1, 0])
    pair_ids = rng.permutation(N * K)[:sizes.sum()]
    lists, start = [], 0  # a list may hold both choices of a token: scatter-add sums them
    for size in sizes:
        lists.append(sorted(pair_ids[start:start + size]))
        start += size
    pairs = np.concatenate([*lists, np.full(6, N * K)]).astype(np.int32)
    expert_of = np.repeat(np.arange(E), sizes)
    x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    pw = jnp.asarray(rng.uniform(size=N * K), jnp.float32)
    weights = _weights(jax.random.key(4))
    probe = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)

    def loop(x, pw, weights):
        return overflow_swiglu(x, jnp.asarray(pairs), jnp.asarray(sizes), pw, K, *weights,
                               limit=0.5, block=4, min_rows=2)

    def per_pair(x, pw, weights):
        gate, up, down = weights
        listed = pairs[:sizes.sum()]
        xe = x[listed // K]
        h = clamped_swiglu(jnp.einsum("rd,rdf->rf", xe, gate[expert_of]),
                           jnp.einsum("rd,rdf->rf", xe, up[expert_of]), 0.5)
        y = jnp.einsum("rf,rfd->rd", h, down[expert_of]) * pw[listed][:, None]
        return jax.ops.segment_sum(y, listed // K, num_segments=N)

    def run(fn):
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(fn(*a)) * probe),
                                          argnums=(0, 1, 2)))(x, pw, weights)

    (want, want_g), (got, got_g) = run(per_pair), run(loop)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(a, b, atol=2e-5)
    assert float(jnp.abs(got_g[1]).max()) > 0  # pair-weight gradients flow
