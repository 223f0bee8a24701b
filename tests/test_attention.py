"""The heads-major "einsum" attention (hand-written backward) against the reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import RopeConfig
from moejax.model.attention.core import (attention_mask, heads_major_attention,
                                         reference_attention, resolve_impl)
from moejax.model.attention.gqa import Attention


def _segments(batch: int, length: int) -> jax.Array:
    """Two packed documents in row 0, one in the others (the mask is not just causal)."""
    seg = np.ones((batch, length), np.int32)
    seg[0, length // 3:] = 2
    return jnp.asarray(seg)


@pytest.mark.parametrize("heads,kv_heads,blocks", [(4, 4, 1), (4, 2, 1), (6, 1, 1),
                                                   (4, 2, 3), (6, 1, 4)])
def test_heads_major_attention_equals_reference_in_values_and_gradients(heads, kv_heads,
                                                                        blocks):
    b, length, k_dim, v_dim = 2, 12, 8, 8  # J != K: tests/test_mla.py
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (b, length, heads, k_dim))
    k = jax.random.normal(keys[1], (b, length, kv_heads, k_dim))
    v = jax.random.normal(keys[2], (b, length, kv_heads, v_dim))
    probe = jax.random.normal(keys[3], (b, length, heads, v_dim))
    mask = attention_mask(_segments(b, length))
    scale = k_dim ** -0.5
    to_hm = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731 - [B,L,H,K] <-> [B,H,L,K]

    def ref_loss(q, k, v):
        return jnp.sum(jnp.sin(reference_attention(q, k, v, mask, scale)) * probe)

    def hm_loss(q, k, v):
        out = to_hm(heads_major_attention(to_hm(q), to_hm(k), to_hm(v), mask, scale,
                                          blocks))
        return jnp.sum(jnp.sin(out) * probe)

    ref_v, ref_g = jax.value_and_grad(ref_loss, argnums=(0, 1, 2))(q, k, v)
    hm_v, hm_g = jax.jit(jax.value_and_grad(hm_loss, argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(hm_v, ref_v, rtol=1e-5, atol=1e-5)
    for got, want in zip(hm_g, ref_g):
        assert float(jnp.abs(want).max()) > 1e-3  # gradients are not trivially zero
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_attention_module_einsum_equals_reference():
    rope = RopeConfig()
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 10, 16))
    seg, pos = _segments(2, 10), jnp.broadcast_to(jnp.arange(10), (2, 10))
    make = lambda impl: Attention(4, 2, 8, rope, impl)  # noqa: E731
    params = jax.jit(make("reference").init)(jax.random.PRNGKey(2), x, seg, pos)

    def loss(params, impl):
        return jnp.sum(make(impl).apply(params, x, seg, pos) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)  # not op by op
    want_v, want_g = value_and_grad(params, "reference")
    got_v, got_g = value_and_grad(params, "einsum")
    np.testing.assert_allclose(got_v, want_v, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 got_g, want_g)


def test_auto_picks_einsum_on_cpu():
    assert resolve_impl("auto") == ("einsum" if jax.default_backend() == "cpu" else "xla")
    assert resolve_impl("cudnn") == "cudnn"
