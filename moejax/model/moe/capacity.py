"""Routed experts and the strategies that move tokens into their capacity buffers.

Every strategy has the same contract: tokens `x` [G, S, D] in groups of S, their routing
(`indices`, `weights` [G, S, T]), a real-token `mask` [G, S] and stacked SwiGLU expert
weights (gate/up [E, D, F], down [E, F, D]). They return the routed output [G, S, D] and
the number of dropped (token, choice) pairs.

Slot assignment (shared by "index" and "einsum"): inside each group, the (token, choice)
pairs claim places in their expert's buffer of capacity C in *choice-major* order: every
token's first choice before any second choice, tokens in sequence order within a choice
(GShard's priority). Pairs beyond C are dropped; padding tokens (mask 0) never take a place.

- "dense": the oracle. Every expert computes every token; gates are zero off the top-k.
- "einsum": GShard dispatch/combine one-hots [G, S, E, C] contracted with einsums.
- "index": the buffers [G, E, C, D] are filled by a gather with per-slot token indices
  and read back by a gather with per-pair slot indices (memory ~ routed tokens).
- "dropless": no capacity; pairs sorted by expert through grouped matmuls (dropless.py).
Buffers are resharded from groups to experts (`act_expert`) before the expert einsums,
which is where GSPMD inserts the all-to-all over the `expert` mesh axis.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from moejax.model.moe.dropless import dropless_dispatch
from moejax.model.moe.experts import ExpertWeights, expert_swiglu
from moejax.model.layers import clamped_swiglu
from moejax.sharding import constrain, per_batch_shard



def capacity(group_size: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(cf * S * T / E), at most S; cf <= 0 means unlimited (C = S, never drops)."""
    if capacity_factor <= 0:
        return group_size
    return max(1, min(group_size, math.ceil(capacity_factor * group_size * top_k / num_experts)))


def run_experts(buffers: jax.Array, weights: ExpertWeights, swiglu_limit: float = 0.0
                ) -> jax.Array:
    """SwiGLU of every expert on its buffer: [G, E, C, D] -> [G, E, C, D] (hidden
    activations sharded like the buffers, F over `act_mlp`)."""
    with jax.named_scope("experts"):
        # the output is constrained to the experts' layout too, so that the backward
        # reshards the cotangent from the token layout to the experts' (an all-to-all)
        # before the transposed einsum; left free, GSPMD gathered the whole global
        # [G, E, C, D] buffer on every chip (measured: 120 GiB per chip, DeepSeek-V4-Flash
        # on 256 chips)
        return _to_experts(expert_swiglu(buffers, weights, swiglu_limit,
                                         ("act_group", "act_expert", None, "act_mlp")))


def _to_experts(buffers: jax.Array) -> jax.Array:
    return constrain(buffers, ("act_group", "act_expert", None, "act_embed"))


def _to_groups(buffers: jax.Array) -> jax.Array:
    return constrain(buffers, ("act_batch", None, None, "act_embed"))


def choice_major(a: jax.Array) -> jax.Array:
    """[G, S, T] -> [G, T*S]: all first choices, then all second choices, ..."""
    return jnp.swapaxes(a, 1, 2).reshape(a.shape[0], -1)


def slot_positions_sorted(expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """Place of each pair in its expert's queue, by a stable sort. [G, P] -> [G, P].

    Pairs with id == num_experts (padding) are queued behind a virtual expert.
    """
    def one_group(ids: jax.Array) -> jax.Array:
        order = jnp.argsort(ids, stable=True)
        sorted_ids = ids[order]
        counts = jnp.zeros(num_experts + 1, jnp.int32).at[ids].add(1)
        starts = jnp.cumsum(counts) - counts
        ranks = jnp.arange(ids.shape[0], dtype=jnp.int32) - starts[sorted_ids]
        return jnp.zeros_like(ids).at[order].set(ranks)
    return jax.vmap(one_group)(expert_ids)


def index_dispatch(x: jax.Array, indices: jax.Array, weights: jax.Array, mask: jax.Array,
                   expert_weights: ExpertWeights, capacity_factor: float,
                   swiglu_limit: float = 0.0
                   ) -> tuple[jax.Array, jax.Array]:
    """Gather tokens into [G, E, C, D] by slot -> token indices; gather results back."""
    g, s, d = x.shape
    num_experts, top_k = expert_weights[0].shape[0], indices.shape[-1]
    c = capacity(s, top_k, num_experts, capacity_factor)
    with jax.named_scope("dispatch"):
        real = jnp.broadcast_to(mask[:, None, :], (g, top_k, s)).reshape(g, -1) > 0
        ids = jnp.where(real, choice_major(indices), num_experts)
        slot, keep = assign_slots(ids, real, num_experts, c)
        buffers = per_batch_shard(
            lambda x_, slot_: gather_to_slots(x_, slot_, num_experts * c, top_k), x, slot)
        buffers = _to_experts(buffers.reshape(g, num_experts, c, d))
    y = _to_groups(run_experts(buffers, expert_weights, swiglu_limit))
    with jax.named_scope("combine"):
        out = per_batch_shard(combine_from_slots, y.reshape(g, num_experts * c, d), slot,
                              weights)
    return out, (real & ~keep).sum()


def assign_slots(ids: jax.Array, eligible: jax.Array, num_experts: int, c: int
                 ) -> tuple[jax.Array, jax.Array]:
    """Slots of the pairs [G, T*S] (choice-major expert ids, num_experts for none).

    Returns (slot = expert * C + place in its queue, or the trash slot E * C for a pair
    dropped or not eligible; keep: the eligible pairs that got a place).
    """
    pos = slot_positions_sorted(ids, num_experts)
    keep = eligible & (pos < c)
    return jnp.where(keep, ids * c + pos, num_experts * c), keep


def gather_to_slots(x: jax.Array, slot: jax.Array, num_slots: int, top_k: int) -> jax.Array:
    """x [G, S, D], slot [G, T*S] -> buffers [G, num_slots, D] (empty slots read zeros)."""
    g, s, d = x.shape
    token = jnp.tile(jnp.arange(s, dtype=jnp.int32), top_k)
    slot_token = jnp.full((g, num_slots + 1), s, jnp.int32)  # + the trash slot
    slot_token = slot_token.at[jnp.arange(g)[:, None], slot].set(token[None, :])
    x_pad = jnp.concatenate([x, jnp.zeros((g, 1, d), x.dtype)], axis=1)
    return jnp.take_along_axis(x_pad, slot_token[:, :num_slots, None], axis=1)


def combine_from_slots(y: jax.Array, slot: jax.Array, weights: jax.Array) -> jax.Array:
    """y [G, num_slots, D], slot [G, T*S], weights [G, S, T] -> sum_t w * y[slot]: [G, S, D]."""
    g, _, d = y.shape
    top_k, s = weights.shape[-1], weights.shape[1]
    y_pad = jnp.concatenate([y, jnp.zeros((g, 1, d), y.dtype)], 1)  # the trash slot reads 0
    picked = jnp.take_along_axis(y_pad, slot[:, :, None], axis=1).reshape(g, top_k, s, d)
    w = jnp.swapaxes(weights, 1, 2).astype(y.dtype)[..., None]  # [G, T, S, 1]
    return (picked * w).sum(axis=1)


def einsum_dispatch(x: jax.Array, indices: jax.Array, weights: jax.Array, mask: jax.Array,
                    expert_weights: ExpertWeights, capacity_factor: float,
                    swiglu_limit: float = 0.0
                    ) -> tuple[jax.Array, jax.Array]:
    """GShard: one-hot dispatch [G,S,E,C] and combine [G,S,E,C] tensors, contracted."""
    g, s, _ = x.shape
    num_experts, top_k = expert_weights[0].shape[0], indices.shape[-1]
    c = capacity(s, top_k, num_experts, capacity_factor)
    with jax.named_scope("dispatch"):
        real = jnp.broadcast_to(mask[:, None, :], (g, top_k, s)).reshape(g, -1) > 0
        onehot = jax.nn.one_hot(choice_major(indices), num_experts, dtype=jnp.int32)
        onehot = onehot * real[..., None]  # [G, T*S, E]
        pos = ((jnp.cumsum(onehot, axis=1) - 1) * onehot).sum(-1)  # [G, T*S]
        keep = real & (pos < c)
        expert_1h = (onehot * keep[..., None]).reshape(g, top_k, s, num_experts)
        slot_1h = jax.nn.one_hot(pos.reshape(g, top_k, s), c, dtype=x.dtype)
        dispatch = jnp.einsum("GTSE,GTSC->GSEC", expert_1h.astype(x.dtype), slot_1h)
        combine = jnp.einsum("GTSE,GTSC,GST->GSEC", expert_1h.astype(x.dtype), slot_1h,
                             weights.astype(x.dtype))
        buffers = _to_experts(jnp.einsum("GSEC,GSD->GECD", dispatch, x))
    y = _to_groups(run_experts(buffers, expert_weights, swiglu_limit))
    with jax.named_scope("combine"):
        out = jnp.einsum("GSEC,GECD->GSD", combine, y)
    dropped = (real & ~keep).sum()
    return out, dropped


def dense_dispatch(x: jax.Array, indices: jax.Array, weights: jax.Array, mask: jax.Array,
                   expert_weights: ExpertWeights, capacity_factor: float,
                   swiglu_limit: float = 0.0
                   ) -> tuple[jax.Array, jax.Array]:
    """Oracle: all experts on all tokens, weighted by the (sparse) top-k gates. Never drops."""
    del capacity_factor
    gate, up, down = (w.astype(x.dtype) for w in expert_weights)
    gates = (jax.nn.one_hot(indices, gate.shape[0], dtype=x.dtype)
             * weights.astype(x.dtype)[..., None]).sum(-2)  # [G, S, E]
    gates = gates * mask[..., None].astype(x.dtype)
    h = clamped_swiglu(jnp.einsum("GSD,EDF->GSEF", x, gate),
                       jnp.einsum("GSD,EDF->GSEF", x, up), swiglu_limit)
    y = jnp.einsum("GSEF,EFD->GSED", h, down)
    return jnp.einsum("GSED,GSE->GSD", y, gates), jnp.zeros((), jnp.int32)


DispatchFn = Callable[..., tuple[jax.Array, jax.Array]]
DISPATCH: dict[str, DispatchFn] = {
    "dense": dense_dispatch,
    "einsum": einsum_dispatch,
    "index": index_dispatch,
    "dropless": dropless_dispatch,
}
