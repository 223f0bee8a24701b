"""The DeepSeek-V4 attention layer: one module for the sliding, CSA and HCA layer types.

See compressed.py for the math. Parameters (torch names of HF in brackets):

    q_a [D, dq] (q_a_proj), q_norm (q_a_norm), q_b [dq, H, dh] (q_b_proj),
    kv [D, dh] (kv_proj), kv_norm, sinks [H], o_a [g, H/g*dh, r] (o_a_proj, per group),
    o_b [g, r, D] (o_b_proj), compressor/{kv_proj, gate_proj, position_bias, kv_norm},
    indexer/{compressor/..., q_b [dq, HI, dI], weights_proj [D, HI]} (CSA only).

Norm weights, sinks and position biases are fp32 whatever `param_dtype` (as HF keeps them).
The layer returns (out [B, L, D], indexer KL): the KL is the lightning indexer's
distillation loss of a CSA layer (indexer_loss.py) when `indexer_loss_coef > 0`, else 0
(not computed). The indexer always reads stop_gradient'ed inputs: its top-k passes no
gradient anyway, so only that loss trains it. With `decode=True` the layer keeps its
incremental state (docs/deepseek_v3_v4.md, "V4 incremental decoding") in the `cache`
collection (see decode.py): call it with the prompt, then with one token at a time.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.model.v4.compressed import (Compressor, banded_sink_attention, entry_segment_mask,
                                     entry_visibility, rope_inv_freq, rotate_tail,
                                     sink_attention, window_mask)
from moejax.model.v4.decode import decode_attention
from moejax.model.v4.hyper import unweighted_rms_norm
from moejax.model.v4.indexer import Indexer
from moejax.model.v4.indexer_loss import indexer_kl
from moejax.model.layers import RMSNorm, linear, normal_init
from moejax.config.v4 import V4AttentionConfig
from moejax.sharding import constrain

DType = Any


def grouped_output(o: jax.Array, o_a: jax.Array, o_b: jax.Array) -> jax.Array:
    """o [B,L,H,dh] -> per group [H/g*dh] @ o_a[g] -> [g*r] @ o_b -> [B,L,D]."""
    b, length = o.shape[:2]
    groups = o_a.shape[0]
    z = jnp.einsum("BLGI,GIR->BLGR", o.reshape(b, length, groups, -1), o_a)
    return jnp.einsum("BLGR,GRD->BLD", z, o_b)


class V4Attention(nn.Module):
    """Shared-KV MQA with sinks, partial interleaved RoPE and (CSA/HCA) compressed keys."""
    cfg: V4AttentionConfig
    layer_type: str  # "sliding" | "csa" | "hca"
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    decode: bool = False
    max_len: int = 4096  # decode: longest sequence the caches hold

    @property
    def rate(self) -> int:
        return {"csa": self.cfg.csa_rate, "hca": self.cfg.hca_rate}.get(self.layer_type, 0)

    def _weights(self, d: int) -> dict[str, jax.Array]:
        a, pd = self.cfg, self.param_dtype
        h, dh, g = a.num_heads, a.head_dim, a.o_groups
        init = lambda *names: normal_init(self.init_std, names)  # noqa: E731
        return {
            "q_a": self.param("q_a", init("embed", "q_lora"), (d, a.q_lora_rank), pd),
            "q_b": self.param("q_b", init("q_lora", "heads", "head_dim"),
                              (a.q_lora_rank, h, dh), pd),
            "kv": self.param("kv", init("embed", "head_dim"), (d, dh), pd),
            "o_a": self.param("o_a", init("heads", None, "o_lora"), (g, h * dh // g, a.o_lora_rank),
                              pd),
            "o_b": self.param("o_b", init("heads", "o_lora", "embed"), (g, a.o_lora_rank, d), pd),
            "sinks": self.param("sinks", nn.with_logical_partitioning(
                nn.initializers.zeros, ("heads",)), (h,), jnp.float32),
        }

    def _submodules(self, d: int) -> tuple[Compressor | None, Indexer | None]:
        a = self.cfg
        args = (self.norm_eps, self.init_std, self.dtype, self.param_dtype)
        if self.layer_type == "sliding":
            return None, None
        comp = Compressor(d, self.rate, a.head_dim, self.layer_type == "csa", *args,
                          name="compressor")
        if self.layer_type == "hca":
            return comp, None
        return comp, Indexer(d, a.q_lora_rank, self.rate, a.index_heads, a.index_head_dim,
                             a.index_topk, *args, name="indexer")

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
        """(out [B, L, D], indexer KL: fp32 scalar, 0 unless a CSA layer computes it)."""
        a, dt = self.cfg, self.dtype
        w = self._weights(x.shape[-1])
        compressor, indexer = self._submodules(x.shape[-1])
        inv = rope_inv_freq(a, "main" if self.layer_type == "sliding" else "compress")
        norm = lambda name: RMSNorm(self.norm_eps, dt, jnp.float32, name=name)  # noqa: E731
        qr = norm("q_norm")(linear(x, w["q_a"].astype(dt)))
        q = linear(qr, w["q_b"].astype(dt))
        q = unweighted_rms_norm(q, self.norm_eps).astype(dt)
        q = constrain(rotate_tail(q, positions, inv), ("act_batch", "act_length", "act_heads",
                                                       None))
        kv = rotate_tail(norm("kv_norm")(linear(x, w["kv"].astype(dt))), positions, inv)
        kl = jnp.zeros((), jnp.float32)
        if self.decode:
            o = decode_attention(self, q, kv, x, qr, positions, w["sinks"], inv, compressor,
                                 indexer)
        else:
            entries, entry_mask, index = self._compressed(x, qr, segment_ids, positions, inv,
                                                          compressor, indexer)
            if index is None or a.indexer_loss_coef == 0:
                o = self._core(q, kv, segment_ids, w["sinks"], entries, entry_mask)
            else:
                o, probs = self._core(q, kv, segment_ids, w["sinks"], entries, entry_mask,
                                      entry_probs=True)
                kl = indexer_kl(probs, *index, segment_ids != 0)
        o = rotate_tail(o, positions, inv, inverse=True)
        o = constrain(o, ("act_batch", "act_length", "act_heads", None))
        return grouped_output(o, w["o_a"].astype(dt), w["o_b"].astype(dt)), kl

    def _core(self, q: jax.Array, kv: jax.Array, segment_ids: jax.Array, sinks: jax.Array,
              entries: jax.Array | None, entry_mask: jax.Array | None,
              entry_probs: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Banded O(L*W) window attention when L is a multiple of W >= 2W, else the dense
        reference (both give the same numbers); `entry_probs` as in `sink_attention`."""
        a, length = self.cfg, q.shape[1]
        scale = a.head_dim ** -0.5
        if length % a.sliding_window == 0 and length >= 2 * a.sliding_window:
            return banded_sink_attention(q, kv, segment_ids, a.sliding_window, sinks, scale,
                                         entries, entry_mask, entry_probs, a.query_tile)
        return sink_attention(q, kv, window_mask(segment_ids, a.sliding_window), sinks, scale,
                              entries, entry_mask, entry_probs)

    def _compressed(self, x: jax.Array, qr: jax.Array, segment_ids: jax.Array,
                    positions: jax.Array, inv: Any, compressor: Compressor | None,
                    indexer: Indexer | None
                    ) -> tuple[jax.Array | None, jax.Array | None,
                               tuple[jax.Array, jax.Array] | None]:
        """Training forward: entries [B, T, dh], which query sees which [B, L, T], and for
        CSA (indexer scores, the KL's candidate entries), both [B, L, T]."""
        if compressor is None:
            return None, None, None
        entries = compressor(x, inv, positions, segment_ids)
        length, num = x.shape[1], entries.shape[1]
        visible = (entry_visibility(length, num, self.rate)[None]
                   & entry_segment_mask(segment_ids, num, self.rate))
        if indexer is None:
            return entries, visible, None
        sg = jax.lax.stop_gradient
        selected, scores = indexer(sg(x), sg(qr), positions, inv, visible, segment_ids)
        if self.cfg.indexer_warmup:
            return entries, visible, (scores, visible)
        return entries, selected, (scores, selected)
