"""The experts of dropless dispatch on XLA:CPU: capacity buffers for the bulk, a loop for the rest.

XLA:CPU runs the body of a while loop on one thread, so a grouped matmul written as a
loop over row windows (grouped_ffn.py) gets no help from the other cores, while a
batched matmul [E, C, D] x [E, D, F] is spread over all of them (bench/README.md has the
numbers). Dropless can still use batched matmuls for most of its pairs:

1. Plan (`plan_slots`). From dropless's sort (sort_pairs: order, sizes): the first C pairs
   of expert e go to slots e * C + 0 .. C - 1 of a capacity buffer; the rest of e's pairs
   (sizes[e] - C of them when positive) form its overflow list. C = ceil(P / E) rounded
   up to a multiple of 8 by default: with balanced routing the buffers are nearly full and
   the overflow is the imbalance only.
2. Bulk. xb [E, C, D] = tokens gathered into the slots (empty slots read zeros), one
   batched SwiGLU over it, and a gather back to the pairs (overflow pairs read zeros).
   The gathers are row_gather.py's, whose VJPs are gathers too.
3. Overflow. The overflow lists through overflow_ffn.py's loop in token space, whose
   work is proportional to the overflow pairs only. It adds into the bulk's output, and
   its VJP into the bulk's gradients (one custom VJP around both).

out[n] = sum_t w[n, t] * (bulk row of pair (n, t), or its overflow row). Equal to the
dense oracle in values and gradients for any routing, however unbalanced (tests).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from moejax.model.moe.experts import ExpertWeights, expert_swiglu
from moejax.model.moe.cpu.overflow_ffn import (Loop, loop_settings, overflow_backward,
                                       overflow_forward)
from moejax.model.moe.row_gather import permute_rows, take_tokens



class SlotPlan(NamedTuple):
    """Where every pair goes. Sentinels: slot E*C (not in a buffer), pair P (empty)."""
    slot_of_pair: jax.Array  # [P] slot of each pair, or E*C for overflow / padding pairs
    pair_of_slot: jax.Array  # [E*C] pair in each slot, or P for an empty slot
    overflow_pairs: jax.Array  # [P - C] pairs past the buffers, by expert; P past the end
    overflow_sizes: jax.Array  # [E] overflow pairs of each expert


def default_capacity(num_pairs: int, num_experts: int) -> int:
    """ceil(P / E) rounded up to a multiple of 8 (whole SIMD rows), at least 8."""
    per_expert = -(-num_pairs // num_experts)
    return max(8, (per_expert + 7) // 8 * 8)


def plan_slots(order: jax.Array, sizes: jax.Array, capacity: int) -> SlotPlan:
    """order [P] (sorted place -> pair, by expert), sizes [E] -> SlotPlan (module doc)."""
    num_pairs, num_experts = order.shape[0], sizes.shape[0]
    starts = jnp.cumsum(sizes) - sizes
    rank = jnp.arange(capacity, dtype=jnp.int32)
    filled = rank[None, :] < sizes[:, None]  # [E, C]
    place = jnp.minimum(starts[:, None] + rank[None, :], num_pairs - 1)
    pair_of_slot = jnp.where(filled, order[place], num_pairs).reshape(-1)
    slots = jnp.arange(num_experts * capacity, dtype=jnp.int32)
    slot_of_pair = jnp.full((num_pairs,), num_experts * capacity, jnp.int32).at[
        pair_of_slot].set(slots, mode="drop", unique_indices=True)

    over = jnp.maximum(sizes - capacity, 0)
    over_ends = jnp.cumsum(over)
    # At most P - C overflow: the overflowing experts hold it plus C buffered pairs each.
    slots_over = max(num_pairs - capacity, 1)
    index = jnp.arange(slots_over, dtype=jnp.int32)
    expert = jnp.searchsorted(over_ends, index, side="right").astype(jnp.int32)
    e = jnp.minimum(expert, num_experts - 1)
    place = jnp.clip(starts[e] + capacity + index - (over_ends - over)[e], 0, num_pairs - 1)
    overflow_pairs = jnp.where(expert < num_experts, order[place], num_pairs)
    return SlotPlan(slot_of_pair, pair_of_slot, overflow_pairs, over)


def bulk_dropless_experts(x: jax.Array, order: jax.Array, sizes: jax.Array,
                          pair_weights: jax.Array, top_k: int,
                          expert_weights: ExpertWeights, limit: float = 0.0,
                          capacity: int | None = None) -> jax.Array:
    """x [N, D], order [P], sizes [E], pair_weights [P] -> sum_t w * expert FFN: [N, D].

    `capacity` is C, the slots per expert of the batched part (None: default_capacity).
    """
    num_experts = expert_weights[0].shape[0]
    capacity = capacity or default_capacity(order.shape[0], num_experts)
    plan = plan_slots(order, sizes, capacity)
    weights = tuple(w.astype(x.dtype) for w in expert_weights)
    loop = loop_settings(plan.overflow_pairs.shape[0], top_k, limit)
    return _bulk_then_overflow(x, plan, pair_weights, weights, loop)


def _bulk(x: jax.Array, plan: SlotPlan, pair_weights: jax.Array,
          weights: tuple[jax.Array, ...], loop: Loop) -> jax.Array:
    """The pairs in capacity slots: gather, batched SwiGLU, gather back, weighted sum."""
    (n, d), num_experts = x.shape, weights[0].shape[0]
    xb = take_tokens(x, plan.pair_of_slot, plan.slot_of_pair, loop.top_k)  # [E*C, D]
    yb = expert_swiglu(xb.reshape(num_experts, -1, d), weights, loop.limit)
    picked = permute_rows(yb.reshape(-1, d), plan.slot_of_pair, plan.pair_of_slot)
    return jnp.einsum("NTD,NT->ND", picked.reshape(n, loop.top_k, d),
                      pair_weights.reshape(n, loop.top_k).astype(x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _bulk_then_overflow(x: jax.Array, plan: SlotPlan, pair_weights: jax.Array,
                        weights: tuple[jax.Array, ...], loop: Loop) -> jax.Array:
    """The bulk, then the overflow loop adding into its output (and, in the VJP, into its
    gradients: overflow_ffn.py's doc says why)."""
    bulk = _bulk(x, plan, pair_weights, weights, loop)
    return overflow_forward(x, plan.overflow_pairs, plan.overflow_sizes, pair_weights,
                            weights, bulk, loop)


def _bulk_then_overflow_fwd(x: jax.Array, plan: SlotPlan, pair_weights: jax.Array,
                            weights: tuple[jax.Array, ...], loop: Loop
                            ) -> tuple[jax.Array, tuple[Any, ...]]:
    bulk, bulk_vjp = jax.vjp(lambda x, w, ws: _bulk(x, plan, w, ws, loop), x, pair_weights,
                             weights)
    out = overflow_forward(x, plan.overflow_pairs, plan.overflow_sizes, pair_weights,
                           weights, bulk, loop)
    return out, (bulk_vjp, x, plan, pair_weights, weights)


def _bulk_then_overflow_bwd(loop: Loop, res: tuple[Any, ...], dout: jax.Array
                            ) -> tuple[Any, ...]:
    bulk_vjp, x, plan, pair_weights, weights = res
    dx, d_pw, d_weights = bulk_vjp(dout)
    dx, d_pw, *d_weights = overflow_backward(
        x, plan.overflow_pairs, plan.overflow_sizes, pair_weights, weights, dout,
        (dx, d_pw, *d_weights), loop)
    return dx, None, d_pw, tuple(d_weights)


_bulk_then_overflow.defvjp(_bulk_then_overflow_fwd, _bulk_then_overflow_bwd)
