"""Basic layers: RMSNorm, token embedding, LM head and the dense SwiGLU FFN."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.sharding import constrain

DType = Any


def linear(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
    """Contracts x's last `contract` dims with w's first ones as one 2-D matmul.

    x [..., K1..Kc], w [K1..Kc, N...] -> [..., N...], computed as [M, K] x [K, N]. XLA:CPU
    gives a dot of a 3-D activation ([B, L, D] @ [D, F]) transposing operand layouts in
    the backward pass (copies of [F, B*L] before the weight-gradient dot): a SwiGLU FFN's
    forward+backward runs ~2x slower written in 3-D than as 2-D matmuls (bench/xla_cpu.py).
    """
    lead, inner = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
    size = math.prod(inner)
    y = x.reshape(-1, size) @ w.reshape(size, -1)
    return y.reshape(*lead, *w.shape[contract:])


def normal_init(std: float, names: tuple[str, ...]) -> Any:
    """Normal(0, std) initialiser carrying logical axis names (one per dimension)."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in fp32, returned in `dtype`."""
    eps: float = 1e-6
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
    """Token embedding table [V, D]; `attend` reuses it as a tied LM head."""
    vocab_size: int
    embed_dim: int
    init_std: float = 0.02
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    def setup(self) -> None:
        self.embedding = self.param("embedding", normal_init(self.init_std, ("vocab", "embed")),
                                    (self.vocab_size, self.embed_dim), self.param_dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
        return constrain(x, ("act_batch", "act_length", "act_embed"))

    def attend(self, x: jax.Array) -> jax.Array:
        return linear(x, self.embedding.astype(self.dtype).T)


class LMHead(nn.Module):
    """Untied output projection D -> V."""
    vocab_size: int
    init_std: float = 0.02
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("kernel", normal_init(self.init_std, ("embed", "vocab")),
                       (x.shape[-1], self.vocab_size), self.param_dtype)
        logits = linear(x, w.astype(self.dtype))
        return constrain(logits, ("act_batch", "act_length", "act_vocab"))


def clamped_swiglu(gate: jax.Array, up: jax.Array, limit: float = 0.0) -> jax.Array:
    """silu(min(gate, L)) * clip(up, -L, L) (DeepSeek-V4 swiglu_limit); L <= 0: plain SwiGLU."""
    if limit > 0:
        gate = jnp.minimum(gate, limit)
        up = jnp.clip(up, -limit, limit)
    return jax.nn.silu(gate) * up


class MLP(nn.Module):
    """Dense SwiGLU feed-forward D -> F -> D (also the shared experts of a MoE layer)."""
    hidden: int
    init_std: float = 0.02
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    swiglu_limit: float = 0.0  # DeepSeek-V4 clamp; 0 = plain SwiGLU

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        init_in = normal_init(self.init_std, ("embed", "mlp"))
        w_gate = self.param("gate", init_in, (d, self.hidden), self.param_dtype)
        w_up = self.param("up", init_in, (d, self.hidden), self.param_dtype)
        w_down = self.param("down", normal_init(self.init_std, ("mlp", "embed")),
                            (self.hidden, d), self.param_dtype)
        dt = self.dtype
        h = clamped_swiglu(linear(x, w_gate.astype(dt)), linear(x, w_up.astype(dt)),
                           self.swiglu_limit)
        h = constrain(h, ("act_batch", "act_length", "act_mlp"))
        return linear(h, w_down.astype(dt))
