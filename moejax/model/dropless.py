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
   ys = gmm(swiglu(gmm(xs, gate), gmm(xs, up)), down)  [P, F] -> [P, D] with ragged_dot on
   GPU/TPU; on CPU the same FFN fused into one pass over the row windows (grouped_ffn.py).
   Rows of padding pairs are never computed (left zero).
4. Combine. out[n] = sum_t w[n, t] * mask[n] * ys[inverse[n*T + t]] (a permutation back,
   VJP: a gather by `order`).

Memory is O(P * (D + F)): no [T, E, C] one-hots and no capacity padding. The sort runs
over all G groups at once (larger segments give larger matmuls); under a mesh GSPMD
gathers the pairs for it, so expert parallelism of this path belongs to a shard_map.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.model.grouped_ffn import grouped_swiglu
from moejax.model.grouped_matmul import default_backend, grouped_matmul, platform_of
from moejax.model.layers import clamped_swiglu

ExpertWeights = tuple[jax.Array, jax.Array, jax.Array]  # gate, up [E,D,F]; down [E,F,D]


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def take_tokens(x: jax.Array, order: jax.Array, inverse: jax.Array, top_k: int
                ) -> jax.Array:
    """xs[j] = x[order[j] // T]: tokens [N, D] -> sorted pairs [P, D]."""
    return jnp.take(x, order // top_k, axis=0)


def _take_tokens_fwd(x: jax.Array, order: jax.Array, inverse: jax.Array, top_k: int
                     ) -> tuple[jax.Array, jax.Array]:
    return take_tokens(x, order, inverse, top_k), inverse


def _take_tokens_bwd(top_k: int, inverse: jax.Array, dxs: jax.Array
                     ) -> tuple[jax.Array, None, None]:
    per_pair = jnp.take(dxs, inverse, axis=0)  # [P, D], token-major
    return per_pair.reshape(-1, top_k, dxs.shape[-1]).sum(1), None, None


take_tokens.defvjp(_take_tokens_fwd, _take_tokens_bwd)


@jax.custom_vjp
def permute_rows(a: jax.Array, perm: jax.Array, inverse: jax.Array) -> jax.Array:
    """a[perm] for a permutation perm whose inverse is given; the VJP is g[inverse]."""
    return jnp.take(a, perm, axis=0)


def _permute_fwd(a: jax.Array, perm: jax.Array, inverse: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    return permute_rows(a, perm, inverse), inverse


def _permute_bwd(inverse: jax.Array, g: jax.Array) -> tuple[jax.Array, None, None]:
    return jnp.take(g, inverse, axis=0), None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


def dropless_dispatch(x: jax.Array, indices: jax.Array, weights: jax.Array, mask: jax.Array,
                      expert_weights: ExpertWeights, capacity_factor: float,
                      swiglu_limit: float = 0.0, backend: str | None = None,
                      block: int = 512, min_rows: int = 32
                      ) -> tuple[jax.Array, jax.Array]:
    """Sort pairs by expert -> grouped-matmul SwiGLU -> unsort and combine (module doc).

    `backend` forces the grouped-matmul backend ("ragged_dot" or "loop"; None: by
    platform); `block` and `min_rows` are the largest and smallest row windows of "loop".
    """
    del capacity_factor
    g, s, d = x.shape
    top_k = indices.shape[-1]
    gate, up, down = expert_weights
    with jax.named_scope("dispatch"):
        order, inverse, sizes = sort_pairs(indices, mask, gate.shape[0])
        xs = take_tokens(x.reshape(g * s, d), order, inverse, top_k)  # [P, D]
    with jax.named_scope("experts"):
        backend = backend or default_backend(platform_of(xs))
        if backend == "loop":  # one fused pass over the windows (grouped_ffn.py)
            ys = grouped_swiglu(xs, gate, up, down, sizes, swiglu_limit, block, min_rows)
        else:
            gmm = functools.partial(grouped_matmul, sizes=sizes, backend=backend)
            h = clamped_swiglu(gmm(xs, gate.astype(x.dtype)), gmm(xs, up.astype(x.dtype)),
                               swiglu_limit)
            ys = gmm(h, down.astype(x.dtype))  # [P, D]
    with jax.named_scope("combine"):
        picked = permute_rows(ys, inverse, order).reshape(g, s, top_k, d)
        w = weights.astype(x.dtype) * mask[..., None].astype(x.dtype)
        out = jnp.einsum("GSTD,GST->GSD", picked, w)
    return out, jnp.zeros((), jnp.int32)
