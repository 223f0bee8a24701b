"""Manifold-constrained hyper-connections (mHC, DeepSeek-V4) and the final hyper-head.

The residual of a V4 model is `n = hc_mult` parallel streams X [B, L, n, D]. Around every
attention and every MoE block an mHC map reads the streams (flattened to n*D, unweighted
RMS-normalised, fp32) and produces, with one linear map `fn` [n*D, (2+n)*n]:

    pre   = sigmoid(mix[:n]    * scale[0] + base[:n])   + eps       [B, L, n]     collapse
    post  = 2 * sigmoid(mix[n:2n] * scale[1] + base[n:2n])          [B, L, n]     expand
    comb  = sinkhorn(mix[2n:] * scale[2] + base[2n:], as [n, n])    [B, L, n, n]  residual mix

The block sees y = sum_j pre_j X_j; its output `out` re-enters as
X'_k = post_k * out + sum_j comb[j, k] X_j  (the sum runs over the FIRST index of comb).

`sinkhorn` is exactly DeepSeek's kernel (docs/deepseek_v3_v4.md, "mHC"): row softmax +
eps, one column normalisation, then iters-1 rounds of (rows, columns), each denominator
+ eps. It ends on a column normalisation, so the result is only approximately doubly
stochastic.

Parameters are fp32 whatever `param_dtype` (as in HF and DeepSeek's code); the mixing itself
runs in fp32 and is cast to the stream dtype once (DeepSeek's reference; HF casts post and
comb to the stream dtype first, which differs only in bf16).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.model.layers import linear

DType = Any


def _param(names: tuple[str | None, ...], init: Any) -> Any:
    return nn.with_logical_partitioning(init, names)


def unweighted_rms_norm(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over the last axis, in fp32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def sinkhorn(logits: jax.Array, iters: int, eps: float) -> jax.Array:
    """[..., n, n] logits -> (approximately) doubly stochastic matrices, DeepSeek's recipe."""
    c = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) + eps
    c = c / (c.sum(-2, keepdims=True) + eps)

    def rows_then_columns(_: int, c: jax.Array) -> jax.Array:
        c = c / (c.sum(-1, keepdims=True) + eps)
        return c / (c.sum(-2, keepdims=True) + eps)
    return jax.lax.fori_loop(0, iters - 1, rows_then_columns, c)  # a loop: small HLO


def flatten_streams(x: jax.Array, eps: float) -> jax.Array:
    """[B, L, n, D] -> [B, L, n*D] (stream-major), unweighted RMS-normalised in fp32."""
    return unweighted_rms_norm(x.reshape(*x.shape[:-2], -1), eps)


def collapse(x: jax.Array, pre: jax.Array) -> jax.Array:
    """sum_j pre_j X_j: [B, L, n, D] x [B, L, n] -> [B, L, D] (stream dtype)."""
    return jnp.einsum("...nd,...n->...d", x.astype(jnp.float32), pre).astype(x.dtype)


def expand(x: jax.Array, out: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """X'_k = post_k * out + sum_j comb[j, k] X_j, mixed in fp32, cast to X's dtype."""
    mixed = jnp.einsum("...jk,...jd->...kd", comb, x.astype(jnp.float32))
    return (post[..., None] * out.astype(jnp.float32)[..., None, :] + mixed).astype(x.dtype)


class HyperConnection(nn.Module):
    """One mHC map: returns (post [B,L,n], comb [B,L,n,n], collapsed input [B,L,D])."""
    hc_mult: int
    sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        n, d = self.hc_mult, x.shape[-1]
        width = (2 + n) * n
        fn = self.param("fn", _param((None, None), nn.initializers.normal(self.init_std)),
                        (n * d, width), jnp.float32)
        base = self.param("base", _param((None,), nn.initializers.zeros), (width,), jnp.float32)
        scale = self.param("scale", _param((None,), nn.initializers.ones), (3,), jnp.float32)
        mix = linear(flatten_streams(x, self.norm_eps), fn)  # [B, L, (2+n)n]
        pre = jax.nn.sigmoid(mix[..., :n] * scale[0] + base[:n]) + self.hc_eps
        post = 2.0 * jax.nn.sigmoid(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
        comb = (mix[..., 2 * n:] * scale[2] + base[2 * n:]).reshape(*mix.shape[:-1], n, n)
        comb = sinkhorn(comb, self.sinkhorn_iters, self.hc_eps)
        return post, comb, collapse(x, pre)


class HyperHead(nn.Module):
    """Final collapse of the n streams: y = sum_j (sigmoid(mix_j * s + b_j) + eps) X_j."""
    hc_mult: int
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, d = self.hc_mult, x.shape[-1]
        fn = self.param("fn", _param((None, None), nn.initializers.normal(self.init_std)),
                        (n * d, n), jnp.float32)
        base = self.param("base", _param((None,), nn.initializers.zeros), (n,), jnp.float32)
        scale = self.param("scale", _param((None,), nn.initializers.ones), (1,), jnp.float32)
        pre = jax.nn.sigmoid(linear(flatten_streams(x, self.norm_eps), fn) * scale[0] + base)
        return collapse(x, pre + self.hc_eps)


def expand_streams(x: jax.Array, hc_mult: int) -> jax.Array:
    """Model input: [B, L, D] -> [B, L, n, D], n identical copies."""
    return jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], hc_mult, x.shape[-1]))
