"""Multi-token prediction (DeepSeek-V3 section 2.2), depth 1.

At position t the module combines the main model's final hidden state h_t with the shared
embedding of the next token t+1 and predicts token t+2:

    x = eh_proj([ enorm(Embed(tok_{t+1})) ; hnorm(h_t) ])        embedding FIRST
    x = DecoderBlock(x)                                           one full MoE layer
    logits = head( norm(x) )                                      the main model's LM head

h_t is the main model's output *after* its final norm, as HuggingFace's `MtpModel` and
vLLM feed it (the paper's "representation given by the main model"). The checkpoint
convention of the concatenation is [embedding; hidden] (the paper writes [h; emb]).
The last position has no token t+1: it gets the embedding of token 0 and its logits are
meaningless; the loss (`moejax.train.loss`, offset 2) never counts it.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import ModelConfig
from moejax.model.layers import RMSNorm, linear, normal_init
from moejax.model.moe.router import weighted_moe_loss

MTP_BIAS = "mtp_bias"  # variable of the `moe_bias` collection: [depth, E] balance biases


def next_tokens(tokens: jax.Array) -> jax.Array:
    """[B, L] -> [B, L]: token t+1 at position t; the last position gets token 0."""
    return jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)


class MTPModule(nn.Module):
    """One MTP depth: norms, the [emb; h] projection and a decoder block (MoE FFN).

    Returns the normalised hidden state (apply the shared LM head to it) and the MoE
    statistics of its block.
    """
    cfg: ModelConfig
    block: Any  # the DecoderBlock class (possibly rematerialised) of the main model

    @nn.compact
    def __call__(self, hidden: jax.Array, next_embedded: jax.Array, bias: jax.Array,
                 segment_ids: jax.Array, positions: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        norm = lambda name: RMSNorm(cfg.norm_eps, dtype, pdtype, name=name)  # noqa: E731
        d = hidden.shape[-1]
        both = jnp.concatenate([norm("enorm")(next_embedded), norm("hnorm")(hidden)], -1)
        w = self.param("eh_proj", normal_init(cfg.init_std, (None, "embed")), (2 * d, d),
                       pdtype)
        x = linear(both, w.astype(dtype))
        x, stats = self.block(cfg, True, False, name="block")(x, bias, segment_ids, positions)
        return norm("norm")(x), stats


def mtp_aux(out: jax.Array, stats: dict[str, jax.Array], balance_loss_coef: float,
            z_loss_coef: float, hidden: bool = False) -> dict[str, jax.Array]:
    """The MTP entries of a model's aux: `mtp_logits` [B, L, V] fp32 (or, with `hidden`,
    `mtp_hidden` [B, L, D]: the block's normalised output before the head), `mtp_expert_load`
    [1, E] and `mtp_moe_loss`, from the MTP block's output and its one layer's stats."""
    stacked = jax.tree.map(lambda a: a[None], stats)
    first = {"mtp_hidden": out} if hidden else {"mtp_logits": out.astype(jnp.float32)}
    return {**first,
            "mtp_expert_load": stacked["expert_load"],
            "mtp_moe_loss": weighted_moe_loss(stacked, balance_loss_coef, z_loss_coef)}
