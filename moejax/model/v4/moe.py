"""DeepSeek-V4 MoE block: sqrtsoftplus scores, hash routing, clamped SwiGLU experts.

    logits = x @ router.kernel (fp32)                        [B, L, E]
    s      = sqrt(softplus(logits))         (score_fn "sqrtsoftplus"; sigmoid / softmax too)
    idx    = top-k(s + bias)                 learned layers (bias: aux-loss-free balancing)
           = tid2eid[token]                  hash layers (the first `num_hash_layers`)
    w      = s[idx] / (sum s[idx] + 1e-20) * routed_scaling_factor   (softmax: no renorm)
    expert(x) = down( silu(min(x@gate, L)) * clip(x@up, -L, L) ),  L = swiglu_limit
    y      = sum_j w_j expert_{idx_j}(x) + shared(x)      (shared: same clamp, width n*I)

`tid2eid` [V, k] int32 is a frozen token -> experts table in the `hash_routing` collection
(not `params`: no gradient, no optimizer state). At init it holds k distinct random experts
per token; imported checkpoints overwrite it. Hash layers ignore the balance bias, and
their `router_entropy` statistic is NaN (not defined: the scores weight the chosen experts
but do not choose them).

The clamp lives in layers.py (`clamped_swiglu`, used by `MLP` and by the `swiglu_limit`
argument of every dispatch strategy), so V4 layers share moe/layer.py's `routed_experts`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.model.layers import MLP, normal_init
from moejax.model.moe.layer import routed_experts
from moejax.model.moe.router import Routing, routing_stats, score, select_experts
from moejax.config.v4 import V4Config, V4MoEConfig
from moejax.model.mtp import MTP_BIAS
from moejax.sharding import constrain

DType = Any
HASH_COLLECTION = "hash_routing"  # Linen collection of the frozen tid2eid tables


def hash_routing(scores: jax.Array, table: jax.Array, tokens: jax.Array, renormalize: bool,
                 scale: float) -> tuple[jax.Array, jax.Array]:
    """Experts fixed by tid2eid[token]; weights from the scores of those experts."""
    indices = jnp.take(table, tokens, axis=0).astype(jnp.int32)  # [B, L, k]
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return indices, weights * scale


def random_tid2eid(key: jax.Array, vocab_size: int, num_experts: int, top_k: int
                   ) -> jax.Array:
    """[V, k] int32: k distinct uniformly random experts per token."""
    noise = jax.random.uniform(key, (vocab_size, num_experts))
    return jnp.argsort(noise, axis=-1)[:, :top_k].astype(jnp.int32)




# ----------------------------------------------------------------------------- modules

class V4Router(nn.Module):
    """fp32 scorer [D, E]; learned top-k on scores + bias, or the frozen hash table."""
    cfg: V4MoEConfig
    is_hash: bool
    vocab_size: int
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, tokens: jax.Array) -> Routing:
        cfg = self.cfg
        w = self.param("kernel", normal_init(self.init_std, ("embed", "expert")),
                       (x.shape[-1], cfg.num_experts), jnp.float32)
        logits = jnp.einsum("BLD,DE->BLE", x.astype(jnp.float32), w)
        scores = score(logits, cfg.score_fn)
        renorm = cfg.score_fn != "softmax"
        if self.is_hash:
            table = self.variable(
                HASH_COLLECTION, "tid2eid", lambda: random_tid2eid(
                    self.make_rng("params"), self.vocab_size, cfg.num_experts, cfg.top_k))
            indices, weights = hash_routing(scores, table.value, tokens, renorm,
                                            cfg.routed_scaling_factor)
        else:
            indices, weights = select_experts(
                scores, jax.lax.stop_gradient(bias).astype(jnp.float32), cfg.top_k,
                renormalize=renorm, scale=cfg.routed_scaling_factor)
        return Routing(indices, weights, scores, logits)


class V4MoE(nn.Module):
    """Router + routed clamped experts + shared expert; returns (y, stats) like moe.MoE."""
    cfg: V4MoEConfig
    is_hash: bool
    vocab_size: int
    init_std: float = 0.02
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, tokens: jax.Array, mask: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        routing = V4Router(cfg, self.is_hash, self.vocab_size, self.init_std, name="router")(
            x, bias, tokens)
        y, dropped = routed_experts(self, x, routing, mask, cfg, cfg.swiglu_limit)
        if cfg.num_shared_experts:
            y = y + MLP(cfg.num_shared_experts * cfg.expert_hidden, self.init_std, self.dtype,
                        self.param_dtype, cfg.swiglu_limit, name="shared")(x)
        stats = routing_stats(routing, mask)
        if self.is_hash:  # experts come from tid2eid[token]: no score distribution picks them
            stats["router_entropy"] = jnp.full((), jnp.nan, jnp.float32)
        stats["dropped_fraction"] = dropped / jnp.maximum(mask.sum() * cfg.top_k, 1)
        return constrain(y, ("act_batch", "act_length", "act_embed")), stats


def bias_update_rates(cfg: V4Config) -> dict[str, Any]:
    """moe_bias variable -> update rate: the main model's `bias` gets [L, 1] rows, 0 on
    hash-routed layers (they never read their row, which stays 0 as in checkpoints)."""
    rate = cfg.moe.bias_update_rate
    learned = [not cfg.is_hash(layer) for layer in range(cfg.num_layers)]
    # numpy, not jnp: a host constant, so building the step allocates on no device
    return {"bias": rate * np.asarray(learned, np.float32)[:, None], MTP_BIAS: rate}
