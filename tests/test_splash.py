"""The splash (Pallas flash) attention path of MLA equals the reference, through the
Pallas interpreter on CPU (the kernel itself is TPU-only)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax.model.attention.core import attention_mask
from moejax.model.attention.mla import reference_attention
from moejax.model.attention.splash import splash_attention


@pytest.mark.slow  # the Pallas interpreter: ~1 min on 2 cores
def test_splash_equals_reference_values_and_grads_on_a_sharded_mesh():
    b, h, length, k_dim, v_dim = 2, 2, 256, 64, 32
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, h, length, k_dim), jnp.float32)
    k = jax.random.normal(keys[1], (b, h, length, k_dim), jnp.float32)
    v = jax.random.normal(keys[2], (b, h, length, v_dim), jnp.float32)
    segment_ids = np.ones((b, length), np.int32)
    segment_ids[0, 100:] = 2  # two documents in row 0
    scale = k_dim ** -0.5

    def ref(q, k, v):
        t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
        return t(reference_attention(t(q), t(k), t(v), attention_mask(segment_ids), scale))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * jnp.cos(jnp.arange(v_dim)))

    mesh = moejax.make_mesh(moejax.MeshConfig(data=2, fsdp=4))
    splash = lambda q, k, v: splash_attention(q, k, v, segment_ids, scale,  # noqa: E731
                                              interpret=True)
    with moejax.use_mesh(mesh):
        out, grads = jax.jit(jax.value_and_grad(loss(splash), (0, 1, 2)))(q, k, v)
    want, want_grads = jax.value_and_grad(loss(ref), (0, 1, 2))(q, k, v)
    np.testing.assert_allclose(out, want, rtol=1e-4)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, atol=2e-4, rtol=1e-3)
