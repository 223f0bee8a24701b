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
        out = dot_product_attention(q, k, v, attention_mask(segment_ids),
                                    self.head_dim ** -0.5, self.impl)
        out = constrain(out, ("act_batch", "act_length", "act_heads", None))
        return jnp.einsum("BLHK,HKD->BLD", out, wo.astype(dt))
