"""Multi-head latent attention (MLA), DeepSeek-V2/V3.

Keys and values are rebuilt from one small per-token latent, which is all a KV cache keeps:

    cq    = RMSNorm(x @ q_down)                  [B,L,Q]   (q_lora_rank > 0; else q = x @ query)
    q     = cq @ q_up                            [B,L,H,K+R]  -> q_nope [.,K] | q_pe [.,R]
    c     = RMSNorm(x @ kv_down)                 [B,L,C]   the compressed key/value latent
    k_pe  = RoPE(x @ k_rope)                     [B,L,R]   one rotary key shared by all heads
    k     = [c @ k_up | k_pe],  v = c @ v_up     [B,L,H,K+R], [B,L,H,J]
    out   = softmax(q.k * scale) v @ out         scale = (K+R)^-0.5 * mscale(factor, all_dim)^2

Shape letters (besides the usual B L S D H): Q query latent, C key/value latent, K no-rope
query/key head dim, R rope head dim, J value head dim.

The full forward expands k and v per head (training, prefill). Decode mode caches only the
latent `c` and the rotated `k_pe` ([B, max_len, C + R] per layer) and attends in the latent
space: q_nope is absorbed into k_up (q_nope @ k_up^T -> [B,L,H,C]) and the attention output
into v_up, so the cache never expands. The tests hold both paths equal.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import MLAConfig, RopeConfig
from moejax.model.attention.splash import SPLASH_MULTIPLE, splash_attention
from moejax.model.attention.core import (HEADS_MAJOR, attention_mask, causal_blocks_for,
                                         heads_major_attention, resolve_impl)
from moejax.model.layers import RMSNorm, linear, normal_init
from moejax.model.rope import apply_rope, yarn_get_mscale
from moejax.sharding import constrain

DType = Any
# HF and DeepSeek's reference build q_a_layernorm / kv_a_layernorm with the default eps
# (1e-6), whatever rms_norm_eps says.
LATENT_NORM_EPS = 1e-6


def softmax_scale(cfg: MLAConfig, rope: RopeConfig) -> float:
    """(K+R)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN with mscale_all_dim."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if rope.yarn_factor > 1.0 and rope.yarn_mscale_all_dim:
        scale *= yarn_get_mscale(rope.yarn_factor, rope.yarn_mscale_all_dim) ** 2
    return scale


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                        scale: float) -> jax.Array:
    """Softmax attention in fp32 with a value dim J != K. [B,L,H,K], [B,S,H,K], [B,S,H,J]."""
    logits = jnp.einsum("BLHK,BSHK->BHLS", q.astype(jnp.float32),
                        k.astype(jnp.float32)) * scale
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("BHLS,BSHJ->BLHJ", probs, v.astype(jnp.float32)).astype(q.dtype)


def expanded_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                       scale: float, impl: str) -> jax.Array:
    """Reference einsums, or jax.nn.dot_product_attention with v zero-padded to K+R."""
    if impl == "reference":
        return reference_attention(q, k, v, mask, scale)
    qk_dim, v_dim = q.shape[-1], v.shape[-1]
    if v_dim < qk_dim:
        v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, qk_dim - v_dim)))
    elif v_dim > qk_dim:
        return reference_attention(q, k, v, mask, scale)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)
    return out[..., :v_dim]


class MLA(nn.Module):
    """Multi-head latent attention; same call signature as `attention.Attention`."""
    num_heads: int
    cfg: MLAConfig
    rope: RopeConfig
    impl: str = "auto"
    init_std: float = 0.02
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    decode: bool = False  # cache the latent and the rope key in the `cache` collection
    max_len: int = 2048  # cache length in decode mode

    def _param(self, name: str, names: tuple[str, ...], shape: tuple[int, ...]) -> jax.Array:
        w = self.param(name, normal_init(self.init_std, names), shape, self.param_dtype)
        return w.astype(self.dtype)

    def _norm(self, name: str) -> RMSNorm:
        return RMSNorm(LATENT_NORM_EPS, self.dtype, self.param_dtype, name=name)

    def _query(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(q_nope [B,H,L,K], rotated q_pe [B,H,L,R]): heads-major."""
        c, h, d = self.cfg, self.num_heads, x.shape[-1]
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        if c.q_lora_rank:
            cq = linear(x, self._param("q_down", ("embed", "q_lora"), (d, c.q_lora_rank)))
            cq = self._norm("q_norm")(cq)
            q = linear(cq, self._param("q_up", ("q_lora", "heads", "head_dim"),
                                       (c.q_lora_rank, h, qk)))
        else:
            q = linear(x, self._param("query", ("embed", "heads", "head_dim"), (d, h, qk)))
        q = constrain(q.transpose(0, 2, 1, 3), HEADS_MAJOR)
        q_nope, q_pe = q[..., :c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]
        return q_nope, apply_rope(q_pe, positions, self._rope(), heads_first=True)

    def _rope(self) -> RopeConfig:
        return dataclasses.replace(self.rope, fraction=1.0)  # every rope channel rotates

    def _latent(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(normalised latent c [B,L,C], rotated shared key k_pe [B,L,R])."""
        c, d = self.cfg, x.shape[-1]
        latent = self._norm("kv_norm")(
            linear(x, self._param("kv_down", ("embed", "kv_lora"), (d, c.kv_lora_rank))))
        k_pe = linear(x, self._param("k_rope", ("embed", "head_dim"), (d, c.qk_rope_head_dim)))
        k_pe = apply_rope(k_pe[:, :, None, :], positions, self._rope())[:, :, 0, :]
        return latent, k_pe

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array
                 ) -> jax.Array:
        c, h, d = self.cfg, self.num_heads, x.shape[-1]
        q_nope, q_pe = self._query(x, positions)
        latent, k_pe = self._latent(x, positions)
        k_up = self._param("k_up", ("kv_lora", "heads", "head_dim"),
                           (c.kv_lora_rank, h, c.qk_nope_head_dim))
        v_up = self._param("v_up", ("kv_lora", "heads", "head_dim"),
                           (c.kv_lora_rank, h, c.v_head_dim))
        w_out = self._param("out", ("heads", "head_dim", "embed"), (h, c.v_head_dim, d))
        scale = softmax_scale(c, self.rope)
        if self.decode:
            out = self._cached_attention(q_nope, q_pe, latent, k_pe, k_up, v_up, scale)
        else:
            k_nope = linear(latent, k_up).transpose(0, 2, 1, 3)  # [B,H,S,K]
            v = linear(latent, v_up).transpose(0, 2, 1, 3)
            out = self._attention(q_nope, q_pe, k_nope, k_pe, v, segment_ids, scale)
        out = constrain(out, HEADS_MAJOR).transpose(0, 2, 1, 3)  # [B,L,H,J]
        return linear(out, w_out, contract=2)

    def _attention(self, q_nope: jax.Array, q_pe: jax.Array, k_nope: jax.Array,
                   k_pe: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float
                   ) -> jax.Array:
        """Expanded (training/prefill) attention, heads-major in and out: -> [B,H,L,J]."""
        q = jnp.concatenate([q_nope, q_pe], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, None], (*k_nope.shape[:3],
                                                                     k_pe.shape[-1]))], -1)
        impl = resolve_impl(self.impl)
        if impl == "splash":  # TPU flash attention: no [B, H, L, S] logits
            if q.shape[2] % SPLASH_MULTIPLE == 0:
                return splash_attention(q, k, v, segment_ids, scale)
            impl = "reference"  # short inputs (init, tests): the kernel needs 128-row tiles
        mask = attention_mask(segment_ids)
        if impl == "einsum":
            return heads_major_attention(q, k, v, mask, scale,
                                         causal_blocks_for(q.shape[2]))
        to_blhk = functools.partial(jnp.transpose, axes=(0, 2, 1, 3))
        return to_blhk(expanded_attention(to_blhk(q), to_blhk(k), to_blhk(v), mask, scale,
                                          impl))

    def _cached_attention(self, q_nope: jax.Array, q_pe: jax.Array, latent: jax.Array,
                          k_pe: jax.Array, k_up: jax.Array, v_up: jax.Array, scale: float
                          ) -> jax.Array:
        """Absorbed attention over the cached latents; writes this call's entries first.

        The cache holds one left-aligned sequence per row; query i of this call sits at
        cache index + i and sees cache entries up to and including itself.
        """
        b, length = latent.shape[:2]
        cached_c = self.variable("cache", "latent", jnp.zeros,
                                 (b, self.max_len, latent.shape[-1]), latent.dtype)
        cached_k = self.variable("cache", "rope_key", jnp.zeros,
                                 (b, self.max_len, k_pe.shape[-1]), k_pe.dtype)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        start = index.value
        cached_c.value = jax.lax.dynamic_update_slice(cached_c.value, latent, (0, start, 0))
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_pe, (0, start, 0))
        index.value = start + length
        query_pos = start + jnp.arange(length)
        mask = jnp.arange(self.max_len)[None, :] <= query_pos[:, None]  # [L, S]
        f32 = jnp.float32
        q_latent = jnp.einsum("BHLK,CHK->BHLC", q_nope.astype(f32), k_up.astype(f32))
        logits = (jnp.einsum("BHLC,BSC->BHLS", q_latent, cached_c.value.astype(f32))
                  + jnp.einsum("BHLR,BSR->BHLS", q_pe.astype(f32),
                               cached_k.value.astype(f32))) * scale
        logits = jnp.where(mask[None, None], logits, jnp.finfo(f32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        out_latent = jnp.einsum("BHLS,BSC->BHLC", probs, cached_c.value.astype(f32))
        return jnp.einsum("BHLC,CHJ->BHLJ", out_latent, v_up.astype(f32)).astype(self.dtype)
