"""DeepSeek-V4 attention: shared-KV sliding window, HCA and CSA compressed entries, sinks.

Per layer (docs/deepseek_v3_v4.md, "V4 forward pass"), for x [B, L, D] at positions t:

    qr = RMSNorm(x @ q_a)                      [B, L, dq]   (also the indexer's query input)
    q  = unweighted_rms(qr @ q_b) per head     [B, L, H, dh], RoPE on the trailing dr channels
    kv = RMSNorm(x @ wkv)                      [B, L, dh],   RoPE at s; key AND value
    keys of query t: the window {s : t-W < s <= t}
                     + compressed entries c_w (HCA: every visible entry; CSA: the visible
                       entries the lightning indexer selects, see indexer.py)
    softmax over [keys, sink_h] with logits q.k / sqrt(dh); the sink column is dropped
    o  = sum p v, de-rotated at -t on the trailing channels
    out = grouped low-rank projection: per group of H/g heads [H/g*dh] -> r, then [g*r] -> D

Compressed entries (`Compressor`): C = x @ kv_proj, Z = x @ gate_proj + position_bias; each
window of m tokens pools its C by a per-channel softmax of Z over the window, then RMSNorm
and RoPE at position w*m (the window's first token). HCA windows do not overlap; CSA's
projections are 2*dh wide: the first half (Ca) of window w-1 and the second half (Cb) of
window w form entry w's 2m slots. Entry w is visible from query t iff (w+1)*m <= t+1.

Two RoPE tables: "main" (rope_theta, no scaling) for sliding-only layers, "compress"
(compress_rope_theta + YaRN, magnitude factor 1) for everything in CSA/HCA layers.

The training forward computes the window in blocks of W (`banded_sink_attention`, O(L*W)
memory) when L is a multiple of W, else with the dense [L, L] reference
(`sink_attention`); compressed entries are scored densely, [L, T] (T = L/m), a gathered
top-k kernel for CSA is future work. `segment_ids` (packed
documents) restrict the window to the query's document, compressed entries to windows
inside it, and a CSA entry's previous-window slots to the same document; an entry rotates
at the `positions` value of its window's first token (w*m for an unpacked row, as HF).
Window boundaries stay row-aligned (multiples of m), so a packed document starting at a
multiple of every rate computes exactly what it would alone; others pool their windows
differently (as HF, which ignores padding and packing in the compressor). With
`decode=True` the `cache` collection holds the incremental state (docs/deepseek_v3_v4.md,
"V4 incremental decoding"; see `V4Attention`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import RopeConfig
from moejax.model.layers import RMSNorm, linear, normal_init
from moejax.model.rope import inverse_frequencies
from moejax.sharding import active_mesh
from moejax.config.v4 import V4AttentionConfig

DType = Any
NEG_INF = -jnp.inf


# ----------------------------------------------------------------------------- RoPE

def rope_inv_freq(a: V4AttentionConfig, table: str) -> np.ndarray:
    """[dr/2] inverse frequencies of the "main" or "compress" table (float64)."""
    if table == "main":
        return inverse_frequencies(a.rope_head_dim, RopeConfig(theta=a.rope_theta))
    cfg = RopeConfig(theta=a.compress_rope_theta, yarn_factor=a.yarn_factor,
                     yarn_original_max_len=a.yarn_original_max_len,
                     yarn_beta_fast=a.yarn_beta_fast, yarn_beta_slow=a.yarn_beta_slow)
    return inverse_frequencies(a.rope_head_dim, cfg)


def rotate_tail(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray,
                inverse: bool = False) -> jax.Array:
    """Interleaved RoPE on the trailing 2*len(inv_freq) channels of x (fp32, cast back).

    `positions` is aligned with x's leading axes ([B, L] for x [B, L, (H,) K]); pairs
    (2i, 2i+1) of the tail rotate by pos * inv_freq[i] (by -pos * inv_freq[i] if inverse).
    """
    dr = 2 * inv_freq.shape[0]
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = angles.reshape(angles.shape[:-1] + (1,) * (x.ndim - angles.ndim) + (dr // 2,))
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if inverse:
        sin = -sin
    rot = x[..., x.shape[-1] - dr:].astype(jnp.float32)
    a, b = rot[..., 0::2], rot[..., 1::2]
    rotated = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(rot.shape)
    return jnp.concatenate([x[..., :x.shape[-1] - dr], rotated.astype(x.dtype)], axis=-1)


# ----------------------------------------------------------------------------- compressor

def pool_windows(kv: jax.Array, gate: jax.Array, position_bias: jax.Array, rate: int,
                 overlap: bool, prev: tuple[jax.Array, jax.Array] | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
    """Gated softmax pooling of complete windows: kv/gate [B, S, c*d] -> [B, S//rate, d].

    Only the first (S // rate) * rate tokens are used. `gate` is without position_bias.
    With `overlap` (c = 2) entry w pools Ca of window w-1 and Cb of window w; `prev`
    ([B, rate, d] kv and gate, the gate with position_bias) fills window 0's Ca slots
    (empty otherwise: kv 0, gate -inf). With `segment_ids` [B, S], window w-1's slots stay
    empty when it starts in another document than window w. Computed in fp32.
    """
    b, s, c = kv.shape
    nw = s // rate
    kv = kv[:, :nw * rate].reshape(b, nw, rate, c).astype(jnp.float32)
    gate = gate[:, :nw * rate].reshape(b, nw, rate, c).astype(jnp.float32) + position_bias
    if overlap:
        d = c // 2
        if prev is None:
            prev = (jnp.zeros((b, rate, d), jnp.float32), jnp.full((b, rate, d), NEG_INF))
        prev_kv = jnp.concatenate([prev[0][:, None].astype(jnp.float32), kv[:, :-1, :, :d]], 1)
        prev_gate = jnp.concatenate([prev[1][:, None].astype(jnp.float32),
                                     gate[:, :-1, :, :d]], 1)
        if segment_ids is not None and nw > 1:
            starts = segment_ids[:, :nw * rate:rate]  # [B, nw]
            same = jnp.concatenate([jnp.ones((b, 1), bool), starts[:, 1:] == starts[:, :-1]], 1)
            prev_gate = jnp.where(same[:, :, None, None], prev_gate, NEG_INF)
        kv = jnp.concatenate([prev_kv, kv[..., d:]], axis=2)  # [B, nw, 2*rate, d]
        gate = jnp.concatenate([prev_gate, gate[..., d:]], axis=2)
    return (jax.nn.softmax(gate, axis=2) * kv).sum(axis=2)


def entry_visibility(num_queries: int, num_entries: int, rate: int,
                     query_offset: int | jax.Array = 0) -> jax.Array:
    """[L, T] bool: query t = offset + i sees entry w iff (w + 1) * rate <= t + 1."""
    t = query_offset + jnp.arange(num_queries)[:, None]
    return (jnp.arange(num_entries)[None, :] + 1) * rate <= t + 1


def entry_segment_mask(segment_ids: jax.Array, num_entries: int, rate: int) -> jax.Array:
    """[B, L, T] bool: entry w's own window lies in the query's document.

    (A CSA entry's slots from the previous window are emptied by `pool_windows` when that
    window starts in another document.)
    """
    w = jnp.arange(num_entries)
    seg_first, seg_last = segment_ids[:, w * rate], segment_ids[:, (w + 1) * rate - 1]
    q = segment_ids[:, :, None]
    return (seg_first[:, None, :] == q) & (seg_last[:, None, :] == q)


class Compressor(nn.Module):
    """Projections + pooling + RMSNorm + RoPE of one compressed-entry series."""
    embed_dim: int  # D
    rate: int
    head_dim: int
    overlap: bool
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    def setup(self) -> None:
        width = (2 if self.overlap else 1) * self.head_dim
        init = normal_init(self.init_std, ("embed", None))
        self.kv_proj = self.param("kv_proj", init, (self.embed_dim, width), self.param_dtype)
        self.gate_proj = self.param("gate_proj", init, (self.embed_dim, width),
                                    self.param_dtype)
        self.position_bias = self.param(
            "position_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None, None)),
            (self.rate, width), jnp.float32)
        self.kv_norm = RMSNorm(self.norm_eps, jnp.float32, jnp.float32, name="kv_norm")

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(kv, gate) [B, L, c*d] of tokens x [B, L, D] (gate without position_bias)."""
        dt = self.dtype
        return linear(x, self.kv_proj.astype(dt)), linear(x, self.gate_proj.astype(dt))

    def finish(self, pooled: jax.Array, first_entry: int | jax.Array, inv_freq: np.ndarray,
               positions: jax.Array | None = None) -> jax.Array:
        """RMSNorm and RoPE of pooled entries [B, T, d] numbered from `first_entry`.

        Entry w rotates at w * rate, or at `positions` [B, T] when given (the position of
        its window's first token, for packed rows whose positions restart per document).
        """
        entries = self.kv_norm(pooled)
        if positions is None:
            positions = (first_entry + jnp.arange(pooled.shape[1]))[None] * self.rate
        return rotate_tail(entries, positions, inv_freq).astype(self.dtype)

    def __call__(self, x: jax.Array, inv_freq: np.ndarray, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """Entries [B, L // rate, d] of all complete windows of x [B, L, D]."""
        kv, gate = self.project(x)
        pooled = pool_windows(kv, gate, self.position_bias, self.rate, self.overlap,
                              segment_ids=segment_ids)
        if positions is not None:
            positions = positions[:, :pooled.shape[1] * self.rate:self.rate]
        return self.finish(pooled, 0, inv_freq, positions)


# ----------------------------------------------------------------------------- core

def window_mask(segment_ids: jax.Array, window: int) -> jax.Array:
    """[B, L, L] bool: t - W < s <= t and same document."""
    length = segment_ids.shape[1]
    t, s = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
    band = (s <= t) & (s > t - window)
    return band[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])


def sink_attention(q: jax.Array, kv: jax.Array, mask: jax.Array, sinks: jax.Array,
                   scale: float, entries: jax.Array | None = None,
                   entry_mask: jax.Array | None = None, entry_probs: bool = False
                   ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Shared-KV attention with a per-head sink column, in fp32.

    q [B, L, H, K]; kv [B, S, K] (key = value); mask [B, L, S]; sinks [H];
    entries [B, T, K] with entry_mask [B, L, T] (optional). Returns [B, L, H, K], and with
    `entry_probs` also the attention probabilities of the entries summed over heads,
    fp32 [B, L, T] (the lightning indexer's distillation target, see indexer_loss.py).
    """
    qf = q.astype(jnp.float32)
    logits = [jnp.where(mask[:, None], jnp.einsum("BLHK,BSK->BHLS", qf, kv.astype(jnp.float32))
                        * scale, NEG_INF)]
    values = [kv]
    if entries is not None and entries.shape[1]:
        logits.append(jnp.where(entry_mask[:, None], scale * jnp.einsum(
            "BLHK,BTK->BHLT", qf, entries.astype(jnp.float32)), NEG_INF))
        values.append(entries)
    b, _, length, _ = logits[0].shape
    sink = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None, None], (b, len(sinks),
                                                                             length, 1))
    probs = jax.nn.softmax(jnp.concatenate(logits + [sink], axis=-1), axis=-1)
    out, start = 0.0, 0
    for part, v in zip(logits, values):
        p = probs[..., start:start + part.shape[-1]]
        out = out + jnp.einsum("BHLS,BSK->BLHK", p, v.astype(jnp.float32))
        start += part.shape[-1]
    if entry_probs:
        return out.astype(q.dtype), _summed_entry_probs(probs, logits[0].shape[-1], entries)
    return out.astype(q.dtype)


def _summed_entry_probs(probs: jax.Array, start: int, entries: jax.Array | None
                        ) -> jax.Array:
    """probs [B, H, L, start + T + 1] -> the T entry columns summed over heads [B, L, T]."""
    b, _, length, _ = probs.shape
    num = 0 if entries is None else entries.shape[1]
    if num == 0:
        return jnp.zeros((b, length, 0), jnp.float32)
    return probs[..., start:start + num].sum(axis=1)


def _pair_blocks(x: jax.Array, block: int) -> jax.Array:
    """[B, L, ...] -> [B, L/block, 2*block, ...]: each block preceded by the previous one."""
    b, length = x.shape[:2]
    cur = x.reshape(b, length // block, block, *x.shape[2:])
    prev = jnp.concatenate([jnp.zeros_like(cur[:, :1]), cur[:, :-1]], axis=1)
    return jnp.concatenate([prev, cur], axis=2)


def banded_sink_attention(q: jax.Array, kv: jax.Array, segment_ids: jax.Array, window: int,
                          sinks: jax.Array, scale: float, entries: jax.Array | None = None,
                          entry_mask: jax.Array | None = None, entry_probs: bool = False,
                          query_tile: int = 0) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`sink_attention` with the window mask of `window_mask`, in O(L * W) memory.

    Queries go in blocks of W; block n sees keys of blocks n-1 and n (2W keys), which holds
    every key of its sliding window. Needs L % W == 0.

    Mixed precision: the products take q, kv and entries in q's dtype and accumulate in
    fp32; softmax is fp32 and the probabilities meet the values in q's dtype (as flash
    attention does). With fp32 inputs (and on XLA:CPU, see `_product_dtype`) this is
    `sink_attention`'s arithmetic.

    `query_tile` > 0 (a multiple of W): the blocks run in tiles of that many queries under
    `jax.checkpoint`, so one tile's scores [B, H, tile, 2W + T + 1] (fp32) are live at a
    time in the forward and the backward instead of the whole sequence's; the tile is the
    largest multiple of W dividing L that is <= query_tile.
    """
    b, length, h, k = q.shape
    nb = length // window
    dtype = _product_dtype(q.dtype)
    qb = q.reshape(b, nb, window, h, k).astype(dtype)
    kb = _pair_blocks(kv.astype(dtype), window)  # [B, nb, 2W, K]
    t = jnp.arange(length).reshape(nb, window)[:, :, None]
    s = (jnp.arange(nb)[:, None] * window - window + jnp.arange(2 * window)[None])[:, None]
    band = (s <= t) & (s > t - window) & (s >= 0)  # [nb, W, 2W]
    same = (segment_ids.reshape(b, nb, window)[..., None]
            == _pair_blocks(segment_ids, window)[:, :, None, :])
    mask = band[None] & same  # [B, nb, W, 2W]
    if entries is not None and entries.shape[1]:
        entries = entries.astype(dtype)
        entry_mask = entry_mask.reshape(b, nb, window, -1)
    else:
        entries = entry_mask = None
    per_tile = _blocks_per_tile(nb, window, query_tile)
    if per_tile == nb:
        out, summed = _block_attention(qb, kb, mask, entry_mask, entries, sinks, scale)
    else:
        out, summed = _tiled_block_attention(qb, kb, mask, entry_mask, entries, sinks, scale,
                                             per_tile)
    out = out.reshape(b, length, h, k).astype(q.dtype)
    if not entry_probs:
        return out
    if summed is None:
        return out, jnp.zeros((b, length, 0), jnp.float32)
    return out, summed.reshape(b, length, -1)


def _product_dtype(dtype: Any) -> Any:
    """The dtype the attention products take: `dtype`, except on XLA:CPU (CPU-only: it has
    no bf16 x bf16 -> fp32 batched dot), where they run in fp32. The platform is the active
    mesh's (a TPU topology's under `moejax.aot`), else the default backend's."""
    devices = getattr(active_mesh(), "devices", None)
    platform = devices.flat[0].platform if devices is not None else jax.default_backend()
    return jnp.float32 if platform == "cpu" else dtype


def _blocks_per_tile(blocks: int, window: int, query_tile: int) -> int:
    """Blocks of W queries per tile: the most that divide `blocks` within query_tile."""
    if query_tile <= 0 or query_tile >= blocks * window:
        return blocks
    limit = max(query_tile // window, 1)
    return max(n for n in range(1, limit + 1) if blocks % n == 0)


def _block_attention(qb: jax.Array, kb: jax.Array, mask: jax.Array,
                     entry_mask: jax.Array | None, entries: jax.Array | None,
                     sinks: jax.Array, scale: float) -> tuple[jax.Array, jax.Array | None]:
    """Blocks of W queries: qb [B, N, W, H, K], kb [B, N, 2W, K], mask [B, N, W, 2W],
    entries [B, T, K] seen through entry_mask [B, N, W, T] (or None) -> out [B, N, W, H, K]
    (fp32) and the entry probabilities summed over heads [B, N, W, T] (fp32, or None)."""
    f32 = jnp.float32
    logits = [jnp.where(mask[:, None], scale * jnp.einsum(
        "BNWHK,BNSK->BHNWS", qb, kb, preferred_element_type=f32), NEG_INF)]
    if entries is not None:
        logits.append(jnp.where(entry_mask[:, None], scale * jnp.einsum(
            "BNWHK,BTK->BHNWT", qb, entries, preferred_element_type=f32), NEG_INF))
    b, h, n, w, keys = logits[0].shape
    sink = jnp.broadcast_to(sinks.astype(f32)[None, :, None, None, None], (b, h, n, w, 1))
    probs = jax.nn.softmax(jnp.concatenate(logits + [sink], axis=-1), axis=-1)
    out = jnp.einsum("BHNWS,BNSK->BNWHK", probs[..., :keys].astype(kb.dtype), kb,
                     preferred_element_type=f32)
    if entries is None:
        return out, None
    p_entries = probs[..., keys:keys + entries.shape[1]]
    out = out + jnp.einsum("BHNWT,BTK->BNWHK", p_entries.astype(entries.dtype), entries,
                           preferred_element_type=f32)
    return out, p_entries.sum(axis=1)


def _tiled_block_attention(qb: jax.Array, kb: jax.Array, mask: jax.Array,
                           entry_mask: jax.Array | None, entries: jax.Array | None,
                           sinks: jax.Array, scale: float, per_tile: int
                           ) -> tuple[jax.Array, jax.Array | None]:
    """`_block_attention` over tiles of `per_tile` blocks, one tile (rematerialised in the
    backward) at a time; the blocks are independent, so the result is the same."""
    def tiles(x: jax.Array) -> jax.Array:  # [B, N, ...] -> [N / per_tile, B, per_tile, ...]
        return jnp.moveaxis(x.reshape(x.shape[0], -1, per_tile, *x.shape[2:]), 1, 0)

    def untile(x: jax.Array) -> jax.Array:
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape(x.shape[0], -1, *x.shape[3:])

    @jax.checkpoint
    def one_tile(xs: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array | None]:
        q_t, k_t, m_t, e_t = xs
        return _block_attention(q_t, k_t, m_t, e_t, entries, sinks, scale)

    emask = None if entry_mask is None else tiles(entry_mask)
    out, summed = jax.lax.map(one_tile, (tiles(qb), tiles(kb), tiles(mask), emask))
    return untile(out), None if summed is None else untile(summed)
