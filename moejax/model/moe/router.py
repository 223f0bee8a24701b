"""Top-k router of DeepSeekMoE, its balance losses and the aux-loss-free bias update.

Scores are computed in fp32 from the token's hidden state: softmax(x W) or sigmoid(x W).
Expert *selection* uses scores + bias (DeepSeek-V3's auxiliary-loss-free balancing, the
bias is `e_score_correction_bias`), optionally limited to the `top_groups` best of
`num_groups` expert groups (group score = sum of the top-2 biased scores in the group).
The *combine weights* use the unbiased scores of the chosen experts, renormalised to sum to
one when asked, times `routed_scaling_factor`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.model.layers import linear, normal_init


@dataclasses.dataclass(frozen=True)
class Routing:
    """Router output for tokens [B, L]: T chosen experts per token and their weights."""
    indices: jax.Array  # [B, L, T] int32, expert ids
    weights: jax.Array  # [B, L, T] fp32 combine weights
    scores: jax.Array  # [B, L, E] fp32 unbiased scores
    logits: jax.Array  # [B, L, E] fp32 router logits


jax.tree_util.register_dataclass(Routing, data_fields=["indices", "weights", "scores",
                                                       "logits"], meta_fields=[])


def score(logits: jax.Array, score_fn: str) -> jax.Array:
    """Router scores [..., E] from fp32 logits: softmax (DeepSeek-V2), sigmoid (V3) or
    sqrt(softplus) (V4)."""
    if score_fn == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    if score_fn == "sigmoid":
        return jax.nn.sigmoid(logits)
    if score_fn == "sqrtsoftplus":
        return jnp.sqrt(jax.nn.softplus(logits))
    raise ValueError(f"unknown score_fn {score_fn!r}")


def limit_groups(biased: jax.Array, num_groups: int, top_groups: int) -> jax.Array:
    """Sets the scores of experts outside the `top_groups` best groups to -inf."""
    if num_groups <= 1:
        return biased
    *lead, e = biased.shape
    grouped = biased.reshape(*lead, num_groups, e // num_groups)
    best = jax.lax.top_k(grouped, min(2, e // num_groups))[0].sum(-1)  # [..., G]
    _, keep_idx = jax.lax.top_k(best, top_groups)
    keep = jax.nn.one_hot(keep_idx, num_groups, dtype=bool).any(-2)  # [..., G]
    masked = jnp.where(keep[..., None], grouped, -jnp.inf)
    return masked.reshape(*lead, e)


def select_experts(scores: jax.Array, bias: jax.Array, top_k: int, num_groups: int = 1,
                   top_groups: int = 1, renormalize: bool = True, scale: float = 1.0
                   ) -> tuple[jax.Array, jax.Array]:
    """Chooses top-k on scores + bias; returns (indices, weights from unbiased scores)."""
    biased = limit_groups(scores + bias, num_groups, top_groups)
    _, indices = jax.lax.top_k(biased, top_k)
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return indices.astype(jnp.int32), weights * scale


class Router(nn.Module):
    """Linear scorer [D, E] (kept in fp32) plus top-k selection."""
    num_experts: int
    top_k: int
    score_fn: str = "softmax"
    renormalize: bool = True
    routed_scaling_factor: float = 1.0
    num_groups: int = 1
    top_groups: int = 1
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> Routing:
        w = self.param("kernel", normal_init(self.init_std, ("embed", "expert")),
                       (x.shape[-1], self.num_experts), jnp.float32)
        logits = linear(x.astype(jnp.float32), w)
        scores = score(logits, self.score_fn)
        indices, weights = select_experts(
            scores, jax.lax.stop_gradient(bias).astype(jnp.float32), self.top_k,
            self.num_groups, self.top_groups, self.renormalize, self.routed_scaling_factor)
        return Routing(indices, weights, scores, logits)


def expert_load(indices: jax.Array, num_experts: int, mask: jax.Array) -> jax.Array:
    """[E] share of the routed (token, choice) pairs that each expert received."""
    counts = (jax.nn.one_hot(indices, num_experts, dtype=jnp.float32)
              * mask[..., None, None]).sum(axis=tuple(range(indices.ndim)))
    return counts / jnp.maximum(counts.sum(), 1.0)


def sequence_balance_loss(routing: Routing, mask: jax.Array) -> jax.Array:
    """DeepSeek-V3 sequence-wise balance loss sum_i f_i P_i, averaged over sequences.

    f_i = E / (T * L_real) * #tokens choosing i;  P_i = mean over tokens of s_i / sum_j s_j.
    Multiply by the coefficient outside.
    """
    num_experts, top_k = routing.scores.shape[-1], routing.indices.shape[-1]
    m = mask.astype(jnp.float32)
    real = jnp.maximum(m.sum(-1), 1.0)  # [B]
    chosen = (jax.nn.one_hot(routing.indices, num_experts) * m[..., None, None]).sum((1, 2))
    f = chosen * num_experts / (top_k * real[:, None])  # [B, E]
    normed = routing.scores / (routing.scores.sum(-1, keepdims=True) + 1e-20)
    p = (normed * m[..., None]).sum(1) / real[:, None]  # [B, E]
    return jnp.mean(jnp.sum(f * p, axis=-1))


def router_z_loss(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """mean over real tokens of logsumexp(logits)^2 (ST-MoE)."""
    z = jax.nn.logsumexp(logits, axis=-1) ** 2
    m = mask.astype(jnp.float32)
    return (z * m).sum() / jnp.maximum(m.sum(), 1.0)


BIAS_COLLECTION = "moe_bias"  # Linen collection of the balance biases (no gradient)


def balance_bias(module: nn.Module, name: str, rows: int, num_experts: int) -> jax.Array:
    """[rows, E] balance biases `moe_bias/{name}` of `module` (zeros at init); call it from
    the module's compact `__call__`."""
    return module.variable(
        BIAS_COLLECTION, name, nn.with_logical_partitioning(jnp.zeros, ("layers", "expert")),
        (rows, num_experts), jnp.float32).value


def weighted_moe_loss(stats: dict[str, jax.Array], balance_loss_coef: float,
                      z_loss_coef: float) -> jax.Array:
    """balance_loss_coef * sum of per-layer balance losses + z_loss_coef * sum of z-losses."""
    return balance_loss_coef * stats["balance_loss"].sum() + z_loss_coef * stats["z_loss"].sum()


def update_balance_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """Aux-loss-free balancing step: bias += rate * sign(mean(load) - load), per layer.

    bias and load are [..., E]; overloaded experts become less likely to be chosen.
    """
    mean = jnp.mean(load, axis=-1, keepdims=True)
    return bias + rate * jnp.sign(mean - load).astype(bias.dtype)


def router_entropy(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over real tokens of the entropy (nats) of p = s / sum_j s_j over all E experts.

    p is the distribution `sequence_balance_loss` uses for P_i: the softmax itself for
    softmax scoring, the normalised sigmoid (V3) or sqrt(softplus) (V4) scores otherwise.
    log(E) means the router cannot tell the experts apart; 0 that one expert takes
    everything. Reported for monitoring only (no gradient flows through aux statistics
    into the loss).
    """
    p = scores / (scores.sum(-1, keepdims=True) + 1e-20)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    m = mask.astype(jnp.float32)
    return (entropy * m).sum() / jnp.maximum(m.sum(), 1.0)


def routing_stats(routing: Routing, mask: jax.Array) -> dict[str, Any]:
    """Per-layer router statistics reported through the model's `aux`."""
    return {
        "expert_load": expert_load(routing.indices, routing.scores.shape[-1], mask),
        "balance_loss": sequence_balance_loss(routing, mask),
        "z_loss": router_z_loss(routing.logits, mask),
        "router_entropy": router_entropy(routing.scores, mask),
    }
