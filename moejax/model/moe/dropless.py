"""Dropless dispatch: every routed (token, choice) pair is computed; nothing is dropped.

Same contract as the strategies in experts.py (x [G, S, D], indices/weights [G, S, T],
mask [G, S], expert weights gate/up [E, D, F], down [E, F, D]) -> (out [G, S, D], 0).
`capacity_factor` is ignored: there are no capacity buffers.

1. Sort. The P = G*S*T pairs, token-major (p = n*T + t over the N = G*S tokens), are
   sorted by expert id (stable); padding tokens (mask 0) get the id E and sort last.
   order [P] (sorted place -> pair), inverse [P] (pair -> sorted place), sizes [E].
2. Dispatch. xs[j] = x[order[j] // T]: [P, D], a gather with a gather for its VJP
   (dx[n] = sum_t dxs[inverse[n*T + t]]), so no scatter-add anywhere.
3. Experts. Grouped matmuls over the sorted rows (grouped_matmul.py):
   ys = gmm(swiglu(gmm(xs, gate), gmm(xs, up)), down)  [P, F] -> [P, D]. Backends
   (`EXPERT_BACKENDS`, `model.moe.dropless_backend`; "auto" = `expert_backend`):
   "ragged_dot" (GPU/TPU), "bulk" (XLA:CPU default: bulk_dropless.py replaces steps 2-4
   with capacity slots of the mean load as batched matmuls plus a loop over the overflow,
   because XLA:CPU runs a loop body on one core) and "loop" (the FFN fused into one pass
   over the row windows, grouped_ffn.py). Rows of padding pairs are never computed.
4. Combine. out[n] = sum_t w[n, t] * mask[n] * ys[inverse[n*T + t]] (a permutation back,
   VJP: a gather by `order`).

Memory is O(P * (D + F)): no [T, E, C] one-hots ("bulk": E * C ~ P slots). The sort runs
over all G groups at once (larger segments give larger matmuls); under a mesh GSPMD
gathers the pairs for it, so expert parallelism of this path belongs to a shard_map.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.model.moe.cpu.bulk_dropless import bulk_dropless_experts
from moejax.model.moe.cpu.grouped_ffn import grouped_swiglu
from moejax.model.moe.grouped_matmul import default_backend, grouped_matmul, platform_of
from moejax.model.layers import clamped_swiglu
from moejax.model.moe.experts import ExpertWeights
from moejax.model.moe.row_gather import permute_rows, take_tokens

EXPERT_BACKENDS = ("ragged_dot", "loop", "bulk")


def sort_pairs(indices: jax.Array, mask: jax.Array, num_experts: int
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[G, S, T] expert ids, [G, S] mask -> order [P], inverse [P], sizes [E] (int32)."""
    real = jnp.broadcast_to(mask[..., None] > 0, indices.shape).reshape(-1)
    ids = jnp.where(real, indices.reshape(-1).astype(jnp.int32), num_experts)
    order = jnp.argsort(ids, stable=True).astype(jnp.int32)
    place = jnp.arange(ids.shape[0], dtype=jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(place, unique_indices=True)
    sizes = jnp.zeros(num_experts + 1, jnp.int32).at[ids].add(1)[:num_experts]
    return order, inverse, sizes


def expert_backend(platform: str) -> str:
    """"ragged_dot" on GPU/TPU; "bulk" on XLA:CPU (bulk_dropless.py, see bench/README.md)."""
    return "bulk" if default_backend(platform) == "loop" else "ragged_dot"


def dropless_dispatch(x: jax.Array, indices: jax.Array, weights: jax.Array, mask: jax.Array,
                      expert_weights: ExpertWeights, capacity_factor: float,
                      swiglu_limit: float = 0.0, backend: str | None = None,
                      block: int = 512, min_rows: int = 32
                      ) -> tuple[jax.Array, jax.Array]:
    """Sort pairs by expert -> grouped SwiGLU -> unsort and combine (module doc).

    `backend` forces how the experts run (one of EXPERT_BACKENDS; None: `expert_backend`
    of the platform); `block` and `min_rows` are the largest and smallest row windows of
    "loop".
    """
    del capacity_factor
    g, s, d = x.shape
    top_k = indices.shape[-1]
    gate, up, down = expert_weights
    backend = backend or expert_backend(platform_of(x))
    if backend not in EXPERT_BACKENDS:
        raise ValueError(f"dropless backend {backend!r}: use one of {list(EXPERT_BACKENDS)}.")
    w = (weights.astype(x.dtype) * mask[..., None].astype(x.dtype)).reshape(-1)  # [P]
    with jax.named_scope("dispatch"):
        order, inverse, sizes = sort_pairs(indices, mask, gate.shape[0])
    if backend == "bulk":
        with jax.named_scope("experts"):
            out = bulk_dropless_experts(x.reshape(g * s, d), order, sizes, w, top_k,
                                        expert_weights, swiglu_limit)
        return out.reshape(g, s, d), jnp.zeros((), jnp.int32)
    with jax.named_scope("dispatch"):
        xs = take_tokens(x.reshape(g * s, d), order, inverse, top_k)  # [P, D]
    with jax.named_scope("experts"):
        if backend == "loop":  # one fused pass over the windows (grouped_ffn.py)
            ys = grouped_swiglu(xs, gate, up, down, sizes, swiglu_limit, block, min_rows)
        else:
            gmm = functools.partial(grouped_matmul, sizes=sizes, backend=backend)
            h = clamped_swiglu(gmm(xs, gate.astype(x.dtype)), gmm(xs, up.astype(x.dtype)),
                               swiglu_limit)
            ys = gmm(h, down.astype(x.dtype))  # [P, D]
    with jax.named_scope("combine"):
        picked = permute_rows(ys, inverse, order).reshape(g, s, top_k, d)
        out = jnp.einsum("GSTD,GST->GSD", picked, w.reshape(g, s, top_k))
    return out, jnp.zeros((), jnp.int32)
