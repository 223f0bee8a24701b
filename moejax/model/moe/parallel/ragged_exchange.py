"""Expert-parallel transport by `jax.lax.ragged_all_to_all`: send each pair to its expert.

Per `expert` shard (n shards, E_l = E / n experts each, P = G_l * S * T local pairs):

    eid    = indices where the token is real, else E (sent nowhere)        [P]
    order  = stable argsort(eid): pairs sorted by expert, hence by destination shard
    counts = per-expert pair counts of every shard (one all_gather)      [n, E]
    plan   = exchange_plans(counts, me, R)           offsets and sizes, both directions
    rows   = ragged_all_to_all(x[token(order)])      [R, D]  pairs of my experts
    y      = dropless SwiGLU of the rows by local expert (../dropless.py; grouped
             matmul: ragged_dot on gpu/tpu, a loop on CPU)                      [R, D]
    back   = ragged_all_to_all(y) with the reverse plan                        [P, D]
    out    = sum_T  w * back[unsort]                                      [G_l, S, D]

The receive buffer holds R = ceil(cf * P) rows (cf <= 0: R = n * P, the worst case, so
nothing is ever dropped). When more pairs are due to a shard than R, sources keep their
order (shard 0 first) and the overflowing tail of a slice is dropped: those pairs add 0.

`ragged_all_to_all` has no XLA:CPU lowering ("not supported by XLA:CPU ThunkEmitter"),
so off gpu/tpu the exchange is `emulated_ragged_all_to_all`: the same semantics written
with an all_gather and gathers (n times the traffic; for tests, not for speed).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.model.moe.dropless import dropless_dispatch


class ExchangePlan(NamedTuple):
    """The four [n] int32 arguments of one ragged_all_to_all call, entry i = shard i."""
    input_offsets: jax.Array  # where the slice for shard i starts in my operand
    send_sizes: jax.Array  # rows I send to shard i
    output_offsets: jax.Array  # where my slice lands in shard i's output
    recv_sizes: jax.Array  # rows I receive from shard i


def receive_rows(pairs: int, shards: int, capacity_factor: float) -> int:
    """R: receive-buffer rows; cf <= 0 -> shards * pairs (never drops)."""
    if capacity_factor <= 0:
        return shards * pairs
    return max(1, min(shards * pairs, math.ceil(capacity_factor * pairs)))


def exchange_plans(counts: jax.Array, me: jax.Array | int, recv_rows: int
                   ) -> tuple[ExchangePlan, ExchangePlan, jax.Array]:
    """Forward and reverse plans of shard `me` from every shard's per-expert counts.

    counts [n, E]: pairs shard s holds for expert e (experts split into n equal blocks).
      to_dst[s, d] = pairs s sends to d        start[s, d] = sum_{s' < s} to_dst[s', d]
      kept[s, d]   = clip(R - start[s, d], 0, to_dst[s, d])    (overflow of R dropped)
      send_off[s, d] = sum_{d' < d} to_dst[s, d']    (slices sorted by destination)
    Returns (forward plan, reverse plan, pairs of `me` dropped by the overflow).
    """
    n = counts.shape[0]
    to_dst = counts.reshape(n, n, -1).sum(-1).astype(jnp.int32)
    start = jnp.cumsum(to_dst, axis=0) - to_dst
    kept = jnp.clip(recv_rows - start, 0, to_dst)
    send_off = jnp.cumsum(to_dst, axis=1) - to_dst
    forward = ExchangePlan(send_off[me], kept[me], start[me], kept[:, me])
    reverse = ExchangePlan(start[:, me], kept[:, me], send_off[:, me], kept[me])
    return forward, reverse, (to_dst[me] - kept[me]).sum()


def emulated_ragged_all_to_all(operand: jax.Array, output: jax.Array, plan: ExchangePlan,
                               axis_name: str) -> jax.Array:
    """ragged_all_to_all's documented semantics from an all_gather (one slice per shard)."""
    ops = jax.lax.all_gather(operand, axis_name)  # [n, P, ...]
    me = jax.lax.axis_index(axis_name)
    gathered = [jax.lax.all_gather(a, axis_name)[:, me] for a in
                (plan.input_offsets, plan.send_sizes, plan.output_offsets)]
    src_off, sizes, dst_off = gathered  # [n_src]: what each source sends me, and where
    r = jnp.arange(output.shape[0])[:, None]
    hit = (r >= dst_off[None]) & (r < (dst_off + sizes)[None])  # [R, n_src]
    src = jnp.argmax(hit, axis=1)
    row = jnp.clip(src_off[src] + r[:, 0] - dst_off[src], 0, operand.shape[0] - 1)
    got = ops[src, row]
    valid = hit.any(axis=1).reshape((-1,) + (1,) * (output.ndim - 1))
    return jnp.where(valid, got, output)


def exchange(operand: jax.Array, output: jax.Array, plan: ExchangePlan, native: bool
             ) -> jax.Array:
    """One ragged_all_to_all over `expert` (native on gpu/tpu, emulated elsewhere)."""
    if not native:
        return emulated_ragged_all_to_all(operand, output, plan, "expert")
    varying = lambda a: jax.typeof(a).manual_axis_type.varying  # noqa: E731
    missing = tuple(sorted(varying(operand) - varying(output)))
    if missing:  # the result varies like the operand; say so before the collective
        output = jax.lax.pcast(output, missing, to="varying")
    return jax.lax.ragged_all_to_all(operand, output, *plan, axis_name="expert")


def local_swiglu_rows(rows: jax.Array, experts: jax.Array, weights: tuple[jax.Array, ...],
                     swiglu_limit: float, backend: str | None = None) -> jax.Array:
    """SwiGLU of rows [R, D] by local expert ids [R] (outside [0, E_l): zero), dropless.

    The rows are R tokens with one choice each, weight 1: `dropless_dispatch` sorts them by
    expert, runs the grouped matmuls and puts the results back in row order.
    """
    e_local = weights[0].shape[0]
    valid = (experts >= 0) & (experts < e_local)
    ids = jnp.where(valid, experts, e_local)[None, :, None]  # [1, R, 1]
    ones = jnp.ones(ids.shape, rows.dtype)
    out, _ = dropless_dispatch(rows[None], ids, ones, valid[None], weights, 0.0, swiglu_limit,
                               backend)
    return out[0]


def ragged_shard(x: jax.Array, indices: jax.Array, weights: jax.Array, mask: jax.Array,
                 gate: jax.Array, up: jax.Array, down: jax.Array, *, num_experts: int,
                 capacity_factor: float, swiglu_limit: float, tensor: bool,
                 batch_axes: tuple[str, ...], native: bool, backend: str | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """Per-shard body of the ragged transport: x [G_l, S, D] -> (out [G_l, S, D], dropped)."""
    g, s, d = x.shape
    top_k = indices.shape[-1]
    pairs = g * s * top_k
    me = jax.lax.axis_index("expert")
    eid = jnp.where(mask[..., None] > 0, indices, num_experts).reshape(pairs)
    order = jnp.argsort(eid, stable=True)
    counts = jnp.zeros(num_experts + 1, jnp.int32).at[eid].add(1)[:num_experts]
    all_counts = jax.lax.all_gather(counts, "expert")  # [n, E]
    r = receive_rows(pairs, all_counts.shape[0], capacity_factor)
    forward, reverse, dropped = exchange_plans(all_counts, me, r)
    send = x.reshape(g * s, d)[order // top_k]
    rows = exchange(send, jnp.zeros((r, d), x.dtype), forward, native)
    ids = exchange(eid[order], jnp.full((r,), -1, eid.dtype), forward, native)
    y = local_swiglu_rows(rows, ids - me * gate.shape[0], (gate, up, down), swiglu_limit,
                          backend)
    if tensor:
        y = jax.lax.psum(y, "tensor")
    back = exchange(y, jnp.zeros((pairs, d), y.dtype), reverse, native)
    pair_out = jnp.zeros_like(back).at[order].set(back).reshape(g, s, top_k, d)
    out = jnp.einsum("GSTD,GST->GSD", pair_out, weights.astype(back.dtype))
    return out, jax.lax.psum(dropped, tuple(dict.fromkeys((*batch_axes, "expert"))))
