"""Decoder blocks, the scanned layer stacks and the top-level `Transformer`.

    embed -> [norm -> attention -> norm -> dense FFN]  x num_dense_layers
          -> [norm -> attention -> norm -> MoE      ]  x num_moe_layers
          -> norm -> LM head                       (+ MTP head, see mtp.py, when asked)

Each stack is one `nn.scan` over a (optionally rematerialised) block, so compile time does
not grow with depth; `scan_layers=False` unrolls the same blocks (the tests hold both equal).
The aux-loss-free balance biases live in the `moe_bias` collection as one [L_moe, E]
array, fed to the scanned MoE blocks row by row; they never receive gradients. The
attention module (GQA or MLA) is chosen by `make_attention` from `model.attention_type`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moejax.config import ModelConfig
from moejax.model.attention.gqa import Attention
from moejax.model.layers import MLP, Embed, LMHead, RMSNorm
from moejax.model.attention.mla import MLA
from moejax.model.moe.layer import MoE
from moejax.model.mtp import MTP_BIAS, MTPModule, mtp_aux, next_tokens
from moejax.model.moe.router import balance_bias, weighted_moe_loss
from moejax.model.remat import LAYER_INPUT, rematerialised
from moejax.sharding import constrain

def make_attention(cfg: ModelConfig, decode: bool, name: str = "attention") -> nn.Module:
    """The attention module selected by `cfg.attention_type` ("gqa" or "mla")."""
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if cfg.attention_type == "mla":
        return MLA(cfg.num_heads, cfg.mla, cfg.rope, cfg.attention_impl, cfg.init_std, dtype,
                   pdtype, decode, cfg.max_seq_len, name=name)
    return Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope,
                     cfg.attention_impl, cfg.init_std, dtype, pdtype, decode, cfg.max_seq_len,
                     name=name)


class DecoderBlock(nn.Module):
    """Pre-norm residual block; the FFN is dense or MoE. Signature fits `nn.scan`."""
    cfg: ModelConfig
    use_moe: bool
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, segment_ids: jax.Array,
                 positions: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        norm = lambda name: RMSNorm(cfg.norm_eps, dtype, pdtype, name=name)  # noqa: E731
        x = checkpoint_name(x, LAYER_INPUT)
        with jax.named_scope("attention"):
            h = make_attention(cfg, self.decode)(norm("attention_norm")(x), segment_ids,
                                                 positions)
        x = x + checkpoint_name(h, "attention_out")
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        h = norm("ffn_norm")(x)
        if self.use_moe:
            with jax.named_scope("moe"):
                h, stats = MoE(cfg.moe, cfg.init_std, dtype, pdtype, name="moe")(
                    h, bias, segment_ids > 0)
        else:
            with jax.named_scope("mlp"):
                h = MLP(cfg.mlp_hidden, cfg.init_std, dtype, pdtype, name="mlp")(h)
            stats = {}
        x = x + checkpoint_name(h, "ffn_out")
        return constrain(x, ("act_batch", "act_length", "act_embed")), stats


def _block_class(cfg: ModelConfig) -> type[DecoderBlock]:
    return rematerialised(DecoderBlock, cfg.remat_policy, cfg.scan_layers)


class LayerStack(nn.Module):
    """`num_layers` blocks of one kind, scanned or unrolled; biases are [num_layers, E]."""
    cfg: ModelConfig
    use_moe: bool
    num_layers: int
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, biases: jax.Array, segment_ids: jax.Array,
                 positions: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        block = _block_class(self.cfg)
        if self.cfg.scan_layers:
            scanned = nn.scan(
                block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast), length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})
            return scanned(self.cfg, self.use_moe, self.decode, name="layers")(
                x, biases, segment_ids, positions)
        per_layer = []
        for i in range(self.num_layers):
            x, stats = block(self.cfg, self.use_moe, self.decode, name=f"layers_{i}")(
                x, biases[i], segment_ids, positions)
            per_layer.append(stats)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *per_layer) if per_layer else {}


class Transformer(nn.Module):
    """DeepSeekMoE decoder. `logits, aux = model.apply(variables, tokens, ...)`.

    aux: `balance_loss`, `z_loss`, `dropped_fraction` [L_moe], `expert_load` [L_moe, E],
    and `moe_loss` = balance_loss_coef * sum(balance_loss) + z_loss_coef * sum(z_loss).

    With `model.mtp.depth = 1` the parameters hold an MTP module (`params/mtp`, its balance
    bias `moe_bias/mtp_bias` [1, E]); `with_mtp=True` also returns `mtp_logits` [B, L, V]
    (position t predicts token t+2), `mtp_expert_load` [1, E] and `mtp_moe_loss`.
    Without `with_mtp` the MTP module is not computed.

    With `return_hidden=True` the model stops before the LM head: it returns the final
    normalised hidden states [B, L, D] (compute dtype) instead of the logits, and
    `mtp_hidden` instead of `mtp_logits`, for a loss that applies the head itself
    (moejax.train.cross_entropy: no [B, L, V] logits in memory).

    With `decode=True` attention keeps keys/values in the `cache` collection: apply with
    `mutable=["cache"]`, the prompt first, then one token at a time, passing `positions`.
    """
    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, with_mtp: bool = False,
                 return_hidden: bool = False) -> tuple[jax.Array, dict[str, Any]]:
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        embed = Embed(cfg.vocab_size, cfg.embed_dim, cfg.init_std, dtype, pdtype, name="embed")
        x = embed(tokens)
        aux: dict[str, Any] = {}
        if cfg.num_dense_layers:
            dummy = jnp.zeros((cfg.num_dense_layers, 1), jnp.float32)
            x, _ = LayerStack(cfg, False, cfg.num_dense_layers, self.decode, name="dense_stack")(
                x, dummy, segment_ids, positions)
        if cfg.num_moe_layers:
            biases = balance_bias(self, "bias", cfg.num_moe_layers, cfg.moe.num_experts)
            x, aux = LayerStack(cfg, True, cfg.num_moe_layers, self.decode, name="moe_stack")(
                x, biases, segment_ids, positions)
            aux["moe_loss"] = weighted_moe_loss(aux, cfg.moe.balance_loss_coef,
                                                cfg.moe.z_loss_coef)
        x = RMSNorm(cfg.norm_eps, dtype, pdtype, name="final_norm")(x)
        head = embed.attend if cfg.tie_embeddings else LMHead(
            cfg.vocab_size, cfg.init_std, dtype, pdtype, name="head")
        out = x if return_hidden else head(x).astype(jnp.float32)
        if cfg.mtp.depth and not self.decode and (with_mtp or self.is_initializing()):
            mtp_bias = balance_bias(self, MTP_BIAS, cfg.mtp.depth, cfg.moe.num_experts)[0]
            mtp_x, stats = MTPModule(cfg, _block_class(cfg), name="mtp")(
                x, embed(next_tokens(tokens)), mtp_bias, segment_ids, positions)
            aux.update(mtp_aux(mtp_x if return_hidden else head(mtp_x), stats,
                               cfg.moe.balance_loss_coef, cfg.moe.z_loss_coef, return_hidden))
        return out, aux
