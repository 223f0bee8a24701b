"""Lightning indexer of DeepSeek-V4's compressed sparse attention (CSA).

docs/deepseek_v3_v4.md, "Lightning indexer".

The indexer owns a second overlapped compressor of width dI (its keys K [B, T, dI], RoPE'd
with the compress table at w*m) and scores every visible entry for every query:

    qI = (qr @ q_b) [B, L, HI, dI], RoPE at t (compress table); no norm on qI
    wI = (x @ weights_proj) * HI^-0.5                             [B, L, HI]
    I[t, w] = sum_h wI[t, h] * ReLU(qI[t, h] . K[w]) * dI^-0.5   (fp32)
    I[t, w] = -inf where w is not visible from t
    selected(t) = top-k(I[t], k = min(index_topk, T)), minus picks that are not visible

Tie-breaking (docs/deepseek_v3_v4.md): `jax.lax.top_k` prefers the lower index among
equal scores, torch's `topk` has no documented order, so exact ties (frequent when every
head's ReLU is 0) may select different entries than HuggingFace. `selection_gap` reports the smallest gap
between the k-th and (k+1)-th visible scores, so a test can assert that no tie decides.

The selection is not differentiable: through the language-model loss the indexer's
weights get no gradient. They train on the KL distillation loss of indexer_loss.py
(`attention.indexer_loss_coef > 0`), which `V4Attention` computes.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.model.v4.compressed import Compressor, rotate_tail
from moejax.model.layers import linear, normal_init

DType = Any


def index_scores(q: jax.Array, keys: jax.Array, head_weights: jax.Array) -> jax.Array:
    """sum_h w[t,h] ReLU(q[t,h] . k[w]) * dI^-0.5: q [B,L,HI,dI], keys [B,T,dI] -> [B,L,T]."""
    dots = jnp.einsum("BLHK,BTK->BLHT", q.astype(jnp.float32), keys.astype(jnp.float32))
    relu = jax.nn.relu(dots) * q.shape[-1] ** -0.5
    return jnp.einsum("BLHT,BLH->BLT", relu, head_weights.astype(jnp.float32))


def select_top_k(scores: jax.Array, visible: jax.Array, k: int) -> jax.Array:
    """[B, L, T] bool: the k best visible entries per query (fewer if fewer are visible)."""
    k = min(k, scores.shape[-1])
    if k == 0:
        return jnp.zeros(scores.shape, bool)
    masked = jnp.where(visible, scores, -jnp.inf)
    _, idx = jax.lax.top_k(masked, k)
    chosen = jnp.put_along_axis(jnp.zeros(scores.shape, bool), idx, True, axis=-1,
                                inplace=False)
    return chosen & visible


def selection_gap(scores: jax.Array, visible: jax.Array, k: int) -> jax.Array:
    """Smallest (k-th best - (k+1)-th best) visible score over the rows with > k visible."""
    masked = jnp.where(visible, scores, -jnp.inf)
    if scores.shape[-1] <= k:
        return jnp.asarray(jnp.inf)
    top = jax.lax.top_k(masked, k + 1)[0]
    gap = top[..., k - 1] - top[..., k]
    return jnp.min(jnp.where(visible.sum(-1) > k, gap, jnp.inf))


class Indexer(nn.Module):
    """Scores compressed entries for each query; returns (selected [B,L,T], scores)."""
    embed_dim: int
    q_lora_rank: int
    rate: int
    num_heads: int
    head_dim: int
    topk: int
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    def setup(self) -> None:
        self.compressor = Compressor(self.embed_dim, self.rate, self.head_dim, True,
                                     self.norm_eps, self.init_std, self.dtype, self.param_dtype)
        self.q_b = self.param("q_b", normal_init(self.init_std, ("q_lora", "heads", "head_dim")),
                              (self.q_lora_rank, self.num_heads, self.head_dim),
                              self.param_dtype)
        self.weights_proj = self.param("weights_proj",
                                       normal_init(self.init_std, ("embed", "heads")),
                                       (self.embed_dim, self.num_heads), self.param_dtype)

    def queries(self, x: jax.Array, qr: jax.Array, positions: jax.Array,
                inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """(qI [B,L,HI,dI] rotated at t, head weights [B,L,HI])."""
        q = linear(qr, self.q_b.astype(self.dtype))
        q = rotate_tail(q, positions, inv_freq)
        w = linear(x, self.weights_proj.astype(self.dtype)).astype(jnp.float32)
        return q, w * self.num_heads ** -0.5

    def __call__(self, x: jax.Array, qr: jax.Array, positions: jax.Array,
                 inv_freq: np.ndarray, visible: jax.Array,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """x [B,L,D], qr [B,L,dq], visible [B or 1, L, T] -> (selected, scores) [B, L, T]."""
        keys = self.compressor(x, inv_freq, positions, segment_ids)
        q, w = self.queries(x, qr, positions, inv_freq)
        scores = index_scores(q, keys, w)
        visible = jnp.broadcast_to(visible, scores.shape)
        return select_top_k(scores, visible, self.topk), scores
