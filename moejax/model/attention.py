"""Grouped-query causal self-attention with packed-document isolation.

A query at position l attends to key s only if s <= l and both carry the same segment id,
so packed documents never see each other. `reference_attention` is the plain-einsum twin
used by the tests.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import RopeConfig
from moejax.model.layers import normal_init
from moejax.model.rope import apply_rope
from moejax.sharding import constrain

DType = Any


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, L, L] boolean: causal and same segment."""
    length = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                        scale: float) -> jax.Array:
    """Softmax attention in fp32. q [B,L,H,K], k/v [B,S,Hkv,K], mask [B,1,L,S] -> [B,L,H,K]."""
    b, length, heads, dim = q.shape
    groups = heads // k.shape[2]
    qg = q.reshape(b, length, k.shape[2], groups, dim).astype(jnp.float32)
    logits = jnp.einsum("BLHGK,BSHK->BHGLS", qg, k.astype(jnp.float32)) * scale
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("BHGLS,BSHK->BLHGK", probs, v.astype(jnp.float32))
    return out.reshape(b, length, heads, dim).astype(q.dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          scale: float, impl: str) -> jax.Array:
    """Dispatches to the reference or to `jax.nn.dot_product_attention` (xla / cudnn)."""
    if impl == "reference":
        return reference_attention(q, k, v, mask, scale)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)


class Attention(nn.Module):
    """GQA: H query heads share H_kv key/value heads; RoPE on q and k."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeConfig
    impl: str = "xla"
    init_std: float = 0.02
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    decode: bool = False  # keep keys/values in the `cache` collection (incremental decoding)
    max_len: int = 2048  # cache length in decode mode

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array
                 ) -> jax.Array:
        d, dt = x.shape[-1], self.dtype
        init_in = normal_init(self.init_std, ("embed", "heads", "head_dim"))
        wq = self.param("query", init_in, (d, self.num_heads, self.head_dim), self.param_dtype)
        wk = self.param("key", init_in, (d, self.num_kv_heads, self.head_dim), self.param_dtype)
        wv = self.param("value", init_in, (d, self.num_kv_heads, self.head_dim),
                        self.param_dtype)
        wo = self.param("out", normal_init(self.init_std, ("heads", "head_dim", "embed")),
                        (self.num_heads, self.head_dim, d), self.param_dtype)
        q = jnp.einsum("BLD,DHK->BLHK", x, wq.astype(dt))
        k = jnp.einsum("BLD,DHK->BLHK", x, wk.astype(dt))
        v = jnp.einsum("BLD,DHK->BLHK", x, wv.astype(dt))
        q = constrain(apply_rope(q, positions, self.rope), ("act_batch", "act_length",
                                                             "act_heads", None))
        k = apply_rope(k, positions, self.rope)
        if self.decode:
            k, v, mask = self._update_cache(k, v)
        else:
            mask = attention_mask(segment_ids)
        out = dot_product_attention(q, k, v, mask, self.head_dim ** -0.5, self.impl)
        out = constrain(out, ("act_batch", "act_length", "act_heads", None))
        return jnp.einsum("BLHK,HKD->BLD", out, wo.astype(dt))

    def _update_cache(self, k: jax.Array, v: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Writes k/v [B, L, Hkv, K] at the cache index; returns the whole cache and a mask.

        The cache holds one left-aligned sequence per row (prompt, then generated tokens);
        the first call (the prompt) creates it. Query i of this call sits at index + i.
        """
        b, length = k.shape[:2]
        shape = (b, self.max_len, self.num_kv_heads, self.head_dim)
        cached_k = self.variable("cache", "key", jnp.zeros, shape, k.dtype)
        cached_v = self.variable("cache", "value", jnp.zeros, shape, v.dtype)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        start = index.value
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, start, 0, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, start, 0, 0))
        index.value = start + length
        query_pos = start + jnp.arange(length)
        mask = jnp.arange(self.max_len)[None, :] <= query_pos[:, None]  # [L, max_len]
        return cached_k.value, cached_v.value, jnp.broadcast_to(mask, (b, 1, *mask.shape))
