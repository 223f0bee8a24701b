"""Incremental decoding state of a DeepSeek-V4 attention layer (docs/deepseek_v3_v4.md,
"V4 incremental decoding").

Called by `V4Attention` when `decode=True`, with a chunk of L new tokens (the prompt, then
one token at a time); every row of the batch is at the same position. The `cache`
collection of the layer holds:

* `index`: tokens seen so far; the chunk sits at positions index .. index + L - 1;
* the sliding window: `window_kv` [B, W, dh] and `window_pos` [W] (slot = position % W,
  -1 = empty), i.e. the last W keys (a key is its own value);
* per compressed series (`compressor`, and for CSA the indexer's `indexer`):
  `{s}_buf_kv` / `{s}_buf_gate` [B, m, c*d]: projections of the tokens of the incomplete
  window, gate *without* position_bias, in slots [0, index % m); `{s}_entries`
  [B, max_len // m, d]: every emitted entry (entry w covers the absolute window
  [w*m, (w+1)*m), emitted once the window is complete); for CSA `{s}_prev_kv` /
  `{s}_prev_gate` [B, m, d]: the Ca half of the last complete window, gate *with*
  position_bias, the first m slots of the next entry.

Each chunk runs the same formulas as the full forward, so prefill + cached decode gives the
full forward's logits (up to indexer ties, docs/deepseek_v3_v4.md). All shapes are static: a chunk's
complete windows are pooled from a scratch of (buffer + chunk) and written with a
dropping scatter at entry index // m onward.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax.model.v4.compressed import (Compressor, entry_visibility, pool_windows,
                                     sink_attention)
from moejax.model.v4.indexer import Indexer, index_scores, select_top_k

NEG_INF = -jnp.inf


def _var(module: Any, name: str, init: Any) -> Any:
    return module.variable("cache", name, init)


def compress_step(module: Any, series: str, comp: Compressor, x: jax.Array, index: jax.Array,
                  inv: np.ndarray, max_len: int) -> jax.Array:
    """Feeds chunk x [B, L, D] to one compressed series; returns all entries [B, Tmax, d]."""
    b, length, _ = x.shape
    rate, d = comp.rate, comp.head_dim
    width = (2 if comp.overlap else 1) * d
    buf_kv = _var(module, f"{series}_buf_kv", lambda: jnp.zeros((b, rate, width), comp.dtype))
    buf_gate = _var(module, f"{series}_buf_gate",
                    lambda: jnp.zeros((b, rate, width), comp.dtype))
    entries = _var(module, f"{series}_entries",
                   lambda: jnp.zeros((b, max(max_len // rate, 1), d), comp.dtype))
    kv, gate = comp.project(x)
    n_buf = index % rate
    scratch = []
    for buf, new in ((buf_kv.value, kv), (buf_gate.value, gate)):
        s = jnp.zeros((b, 2 * rate + length, width), new.dtype).at[:, :rate].set(buf)
        scratch.append(jax.lax.dynamic_update_slice(s, new, (0, n_buf, 0)))
    n_new = (n_buf + length) // rate
    prev = None
    if comp.overlap:
        prev_kv = _var(module, f"{series}_prev_kv", lambda: jnp.zeros((b, rate, d), jnp.float32))
        prev_gate = _var(module, f"{series}_prev_gate",
                         lambda: jnp.full((b, rate, d), NEG_INF, jnp.float32))
        prev = (prev_kv.value, prev_gate.value)
    pooled = pool_windows(scratch[0], scratch[1], comp.position_bias, rate, comp.overlap, prev)
    first = index // rate
    fresh = comp.finish(pooled, first, inv)  # [B, candidates, d]
    slot = jnp.arange(fresh.shape[1])
    target = jnp.where(slot < n_new, first + slot, entries.value.shape[1])  # OOB: dropped
    entries.value = entries.value.at[:, target].set(fresh.astype(entries.value.dtype),
                                                    mode="drop")
    take = lambda s, start, size: jax.lax.dynamic_slice(  # noqa: E731
        s, (0, start, 0), (b, rate, size))
    buf_kv.value = take(scratch[0], n_new * rate, width)
    buf_gate.value = take(scratch[1], n_new * rate, width)
    if comp.overlap:
        last = jnp.maximum(n_new - 1, 0) * rate
        new_kv = take(scratch[0], last, width)[..., :d].astype(jnp.float32)
        new_gate = (take(scratch[1], last, width).astype(jnp.float32)
                    + comp.position_bias)[..., :d]
        prev_kv.value = jnp.where(n_new > 0, new_kv, prev_kv.value)
        prev_gate.value = jnp.where(n_new > 0, new_gate, prev_gate.value)
    return entries.value


def _window(module: Any, kv: jax.Array, index: jax.Array, window: int
            ) -> tuple[jax.Array, jax.Array]:
    """Keys [B, W + L, dh] (cached window, then the chunk) and their positions [W + L]."""
    b, length, dh = kv.shape
    cached_kv = _var(module, "window_kv", lambda: jnp.zeros((b, window, dh), kv.dtype))
    cached_pos = _var(module, "window_pos", lambda: jnp.full((window,), -1, jnp.int32))
    pos_new = index + jnp.arange(length, dtype=jnp.int32)
    keys = jnp.concatenate([cached_kv.value, kv], axis=1)
    key_pos = jnp.concatenate([cached_pos.value, pos_new])
    keep = min(length, window)
    slots = pos_new[length - keep:] % window
    cached_kv.value = cached_kv.value.at[:, slots].set(kv[:, length - keep:])
    cached_pos.value = cached_pos.value.at[slots].set(pos_new[length - keep:])
    return keys, key_pos


def decode_attention(module: Any, q: jax.Array, kv: jax.Array, x: jax.Array, qr: jax.Array,
                     positions: jax.Array, sinks: jax.Array, inv: np.ndarray,
                     compressor: Compressor | None, indexer: Indexer | None) -> jax.Array:
    """Attention output [B, L, H, dh] of a chunk, updating the layer's cache."""
    a = module.cfg
    b, length = q.shape[:2]
    index_var = _var(module, "index", lambda: jnp.zeros((), jnp.int32))
    index = index_var.value
    keys, key_pos = _window(module, kv, index, a.sliding_window)
    t = index + jnp.arange(length)[:, None]
    mask = (key_pos[None] <= t) & (key_pos[None] > t - a.sliding_window) & (key_pos[None] >= 0)
    mask = jnp.broadcast_to(mask[None], (b, *mask.shape))
    entries = entry_mask = None
    if compressor is not None:
        entries = compress_step(module, "compressor", compressor, x, index, inv, module.max_len)
        visible = entry_visibility(length, entries.shape[1], compressor.rate, index)[None]
        entry_mask = jnp.broadcast_to(visible, (b, length, entries.shape[1]))
        if indexer is not None:
            keys_i = compress_step(module, "indexer", indexer.compressor, x, index, inv,
                                   module.max_len)
            qi, wi = indexer.queries(x, qr, positions, inv)
            entry_mask = select_top_k(index_scores(qi, keys_i, wi), entry_mask, indexer.topk)
    index_var.value = index + length
    return sink_attention(q, keys, mask, sinks, a.head_dim ** -0.5, entries, entry_mask)
