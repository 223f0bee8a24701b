"""The loss of a batch of packed rows, every term in one place.

Rows are packed documents (tokens, segment_ids, positions: int32 [B, L]). A prediction of
the token `offset` places ahead of position t counts iff tokens t .. t+offset all lie in
one document (equal, non-zero segment ids), so no prediction crosses a document boundary
and padding (segment 0) is never a target:

    cross_entropy = sum of counted -log p(token t+1) / number counted        (offset 1)
    mtp_cross_entropy = the same for the MTP head's token t+2                 (offset 2)
    loss = cross_entropy + mtp_weight * mtp_cross_entropy
           + aux["moe_loss"] + aux["mtp_moe_loss"]    (weighted balance / z-losses)
           + the architecture's extra losses, e.g. aux["indexer_loss"] (DeepSeek-V4's
             lightning-indexer KL, `Architecture.extra_losses`; already weighted)

The MTP terms exist when the model returned `mtp_logits` (model.mtp.depth > 0 and
`with_mtp=True`, DeepSeek-V3 section 2.2). `total_loss` is the only place the terms are
summed; `batch_loss` (the differentiated loss of one micro-batch, and the held-out loss)
and `loss_metrics` (the logged values of a whole step) both go through it.

All cross-entropy goes through `shifted_nll`: `token_nll(logits, targets, mask)` on whole
logits, or with `train.loss_chunk` > 0 the tiled kernel of `moejax.train.cross_entropy`
(the LM head applied per sequence tile, never the [B, L, V] fp32 logits).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from moejax.config import Config
from moejax.train.cross_entropy import shifted_token_nll
from moejax.train.expert_load import load_summary

Batch = dict[str, jax.Array]
# aux entries of the model carried into the statistics (means over the batch).
MOE_STATS = ("balance_loss", "z_loss", "dropped_fraction", "expert_load", "mtp_expert_load",
             "router_entropy")


def mtp_depth(cfg: Config) -> int:
    """Multi-token-prediction depth of the model (0 when the config has no MTP section)."""
    return int(getattr(getattr(cfg.model, "mtp", None), "depth", 0))


def mtp_weight(cfg: Config) -> float:
    """Weight of the MTP cross-entropy in the loss (0 without MTP)."""
    return float(cfg.model.mtp.loss_weight) if mtp_depth(cfg) else 0.0


def target_mask(segment_ids: jax.Array, offset: int = 1) -> jax.Array:
    """bool [B, L-offset]: whether token t+offset is a loss target for position t."""
    length = segment_ids.shape[1] - offset
    current = segment_ids[:, :length]
    mask = current != 0
    for k in range(1, offset + 1):
        mask = mask & (segment_ids[:, k:k + length] == current)
    return mask


def token_nll(logits: jax.Array, targets: jax.Array, mask: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
    """(sum over `mask` of -log softmax(logits)[target], number of counted targets).

    logits [B, N, V], targets int [B, N], mask bool [B, N]; fp32 scalars out.
    """
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask).astype(jnp.float32)


def shifted_nll(out: jax.Array, tokens: jax.Array, segment_ids: jax.Array, offset: int = 1,
                head: jax.Array | None = None, chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """(summed NLL, count) of predicting token t+offset at position t.

    Without `head`, `out` is the logits [B, L, V] (`token_nll`); with `head` [D, V], `out`
    is the final hidden state [B, L, D] and the head is applied in sequence tiles of
    `chunk` positions (`cross_entropy.shifted_token_nll`: no [B, L, V] logits kept).
    """
    mask = target_mask(segment_ids, offset)
    if head is None:
        return token_nll(out[:, :-offset], tokens[:, offset:], mask)
    return shifted_token_nll(out, head, tokens, mask, offset, chunk)


@dataclasses.dataclass(frozen=True)
class Denominators:
    """Target counts (at least 1) the summed NLLs are divided by."""
    count: jax.Array  # next-token targets
    mtp_count: jax.Array  # MTP (t+2) targets; 1 without MTP


def target_counts(segment_ids: jax.Array, with_mtp: bool) -> Denominators:
    """Whole-batch target counts, at least 1 (micro-batches divide by these)."""
    count = lambda offset: jnp.maximum(  # noqa: E731
        jnp.sum(target_mask(segment_ids, offset)), 1).astype(jnp.float32)
    return Denominators(count(1), count(2) if with_mtp else jnp.ones((), jnp.float32))


def total_loss(cross_entropy: jax.Array, moe_loss: jax.Array, mtp_cross_entropy: jax.Array,
               extra: Sequence[jax.Array], weight_mtp: float) -> jax.Array:
    """The one sum of the loss terms (see the module docstring)."""
    return cross_entropy + weight_mtp * mtp_cross_entropy + moe_loss + sum(extra)


def batch_loss(out: jax.Array, aux: dict[str, jax.Array], batch: Batch, weight_mtp: float,
               denominators: Denominators | None = None, share: float = 1.0,
               extra_losses: Sequence[str] = (), head: jax.Array | None = None,
               chunk: int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, statistics) of one batch from the model's outputs.

    `out` is the logits [B, L, V] (aux `mtp_logits`), or with `head` the final hidden state
    [B, L, D] (aux `mtp_hidden`, the model called with `return_hidden=True`) whose
    cross-entropy is tiled over `chunk` positions (see `shifted_nll`).

    `denominators` are the whole batch's target counts when this batch is one micro-batch
    of it (default: this batch's own); `share` (1 / number of micro-batches) scales the
    per-batch means (MoE and indexer losses, MoE statistics), so that summing the losses
    and statistics of the micro-batches gives the whole batch's. Statistics: `nll`,
    `count` (and `mtp_nll`, `mtp_count`) sums, `moe_loss`, the `extra_losses` (aux
    entries, e.g. `indexer_loss`) and the `MOE_STATS` present in aux, scaled by `share`;
    `loss_metrics` turns their sums into the logged metrics.
    """
    tokens, segment_ids = batch["tokens"], batch["segment_ids"]
    mtp_out = aux.get("mtp_hidden" if head is not None else "mtp_logits")
    with_mtp = mtp_out is not None
    if denominators is None:
        denominators = target_counts(segment_ids, with_mtp)
    zero = jnp.zeros((), jnp.float32)
    nll, count = shifted_nll(out, tokens, segment_ids, 1, head, chunk)
    stats = {"nll": nll, "count": count}
    stats.update({k: aux[k] * share for k in MOE_STATS if k in aux})
    moe_loss = aux.get("moe_loss", zero) + aux.get("mtp_moe_loss", zero)
    stats["moe_loss"] = moe_loss * share
    mtp_ce = zero
    if with_mtp:
        mtp_nll, mtp_count = shifted_nll(mtp_out, tokens, segment_ids, 2, head, chunk)
        stats.update(mtp_nll=mtp_nll, mtp_count=mtp_count)
        mtp_ce = mtp_nll / denominators.mtp_count
    stats.update({name: aux[name] * share for name in extra_losses})
    loss = total_loss(nll / denominators.count, stats["moe_loss"], mtp_ce,
                      [stats[name] for name in extra_losses], weight_mtp)
    return loss, stats


def loss_metrics(stats: dict[str, jax.Array], weight_mtp: float,
                 extra_losses: Sequence[str] = ()) -> dict[str, jax.Array]:
    """Logged loss metrics from a batch's summed `batch_loss` statistics: `loss`,
    `cross_entropy`, `target_tokens` [, `mtp_cross_entropy`, the extra losses, `moe/*`].

    The `moe/*` entries: scalar means over MoE layers of the balance loss, z-loss and
    dropped fraction; per MoE layer [L_moe] `load_max_over_mean`, the `expert_load`
    statistics (`load_cv`, `dead_experts`, `load_min_share`, `load_max_share`) and
    `router_entropy`; and `moe/expert_load` itself [L_moe, E] (for pictures)."""
    zero = jnp.zeros((), jnp.float32)
    ce = stats["nll"] / jnp.maximum(stats["count"], 1.0)
    metrics = {"cross_entropy": ce, "target_tokens": stats["count"]}
    mtp_ce = zero
    if "mtp_nll" in stats:
        mtp_ce = stats["mtp_nll"] / jnp.maximum(stats["mtp_count"], 1.0)
        metrics["mtp_cross_entropy"] = mtp_ce
    metrics.update({name: stats[name] for name in extra_losses})
    metrics["loss"] = total_loss(ce, stats["moe_loss"], mtp_ce,
                                 [stats[name] for name in extra_losses], weight_mtp)
    if "expert_load" in stats:
        load = stats["expert_load"]
        metrics.update({
            "moe/balance_loss": jnp.mean(stats["balance_loss"]),
            "moe/z_loss": jnp.mean(stats["z_loss"]),
            "moe/dropped_fraction": jnp.mean(stats["dropped_fraction"]),
            "moe/load_max_over_mean": jnp.max(load, -1) / jnp.mean(load, -1),
            "moe/expert_load": load})
        metrics.update({f"moe/{k}": v for k, v in load_summary(load).items()})
        if "router_entropy" in stats:
            metrics["moe/router_entropy"] = stats["router_entropy"]
    return metrics
