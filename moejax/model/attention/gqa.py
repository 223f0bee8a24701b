"""Grouped-query causal self-attention (GQA) with packed-document isolation and a KV cache.

The attention cores (masks, reference, the heads-major einsum kernel) are in core.py.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import RopeConfig
from moejax.model.attention.core import (HEADS_MAJOR, resolve_impl, attention_mask, causal_blocks_for, heads_major_attention, dot_product_attention)
from moejax.model.layers import linear, normal_init
from moejax.model.rope import apply_rope
from moejax.sharding import constrain

DType = Any


class Attention(nn.Module):
    """GQA: H query heads share H_kv key/value heads; RoPE on q and k."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeConfig
    impl: str = "auto"
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
        if resolve_impl(self.impl) == "einsum" and not self.decode:
            return self._heads_major(x, segment_ids, positions, (wq, wk, wv, wo))
        q, k, v = (linear(x, w.astype(dt)) for w in (wq, wk, wv))
        q = constrain(apply_rope(q, positions, self.rope), ("act_batch", "act_length",
                                                             "act_heads", None))
        k = apply_rope(k, positions, self.rope)
        if self.decode:
            k, v, mask = self._update_cache(k, v)
        else:
            mask = attention_mask(segment_ids)
        out = dot_product_attention(q, k, v, mask, self.head_dim ** -0.5,
                                    resolve_impl(self.impl))
        out = constrain(out, ("act_batch", "act_length", "act_heads", None))
        return linear(out, wo.astype(dt), contract=2)

    def _heads_major(self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array,
                     weights: tuple[jax.Array, ...]) -> jax.Array:
        """The "einsum" implementation: q/k/v projected straight to [B, H, L, K]."""
        wq, wk, wv, wo = (w.astype(self.dtype) for w in weights)
        q, k, v = (linear(x, w).transpose(0, 2, 1, 3) for w in (wq, wk, wv))
        q = constrain(apply_rope(q, positions, self.rope, heads_first=True), HEADS_MAJOR)
        k = apply_rope(k, positions, self.rope, heads_first=True)
        out = heads_major_attention(q, k, v, attention_mask(segment_ids),
                                    self.head_dim ** -0.5, causal_blocks_for(x.shape[1]))
        out = constrain(out, HEADS_MAJOR).transpose(0, 2, 1, 3)
        return linear(out, wo, contract=2)

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
