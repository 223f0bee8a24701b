"""Expert SwiGLU for a short list of routed pairs, gathered and scattered in token space.

    out[n] = sum over the listed pairs p of token n (p in expert e's list):
             w[p] * swiglu(x[n] @ gate[e], x[n] @ up[e]) @ down[e]

x [N, D] tokens, pairs [V] pair ids (p = n * T + t) sorted by expert, sizes [E] (expert e
owns pairs[start_e : start_e + sizes[e]], start = cumsum(sizes) - sizes; entries past
sum(sizes) are the sentinel P), pair_weights [P] routing weights, gate/up [E, D, F],
down [E, F, D] -> out [N, D].

This is the overflow half of the CPU dropless path (bulk_dropless.py): the pairs an
expert receives beyond its capacity buffer. There are few of them, but how many is only
known at run time, and V must be the worst case, so nothing here is proportional to V
rows of D: each row window of an expert's list (grouped_matmul.over_windows) gathers its
token rows from x, runs the expert's FFN and scatter-adds w * y into out inside the loop.
The VJP is written by hand and keeps no residuals but the inputs: per window it gathers
x and dout, recomputes the FFN, scatter-adds dx, sets d pair_weights = <dout[n], y>, and
accumulates the expert's weight gradients in the loop carry. The loops visit only the
experts whose list is not empty.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from moejax.model.grouped_ffn import expert_in_out, f32_dot
from moejax.model.grouped_matmul import over_windows, segment_bounds
from moejax.model.layers import clamped_swiglu
from moejax.model.row_gather import take_rows


def overflow_swiglu(x: jax.Array, pairs: jax.Array, sizes: jax.Array,
                    pair_weights: jax.Array, top_k: int, gate: jax.Array, up: jax.Array,
                    down: jax.Array, limit: float = 0.0, block: int = 256,
                    min_rows: int = 16) -> jax.Array:
    """x [N, D], pairs [V], sizes [E], pair_weights [P] -> out [N, D] (module doc).

    `limit` is the SwiGLU clamp (layers.clamped_swiglu); `block` and `min_rows` the largest
    and smallest row windows.
    """
    block = max(1, min(block, pairs.shape[0]))
    return _ffn(x, pairs.astype(jnp.int32), sizes.astype(jnp.int32), pair_weights,
                gate.astype(x.dtype), up.astype(x.dtype), down.astype(x.dtype), top_k,
                float(limit), block, max(1, min(min_rows, block)))


class _Window:
    """A window's pair ids, token ids and routing weights; rows outside the segment get
    the sentinels (pair P, token N), so gathers read zeros and scatters drop them."""

    def __init__(self, pairs: jax.Array, s: jax.Array, rows: int, mask: jax.Array | None,
                 pair_weights: jax.Array, top_k: int, num_tokens: int):
        num_pairs = pair_weights.shape[0]
        pid = lax.dynamic_slice_in_dim(pairs, s, rows, 0)
        if mask is not None:
            pid = jnp.where(mask, pid, num_pairs)
        self.pid = pid
        self.tok = jnp.where(pid < num_pairs, pid // top_k, num_tokens)
        self.w = take_rows(pair_weights, pid)

    def gather(self, a: jax.Array) -> jax.Array:
        return take_rows(a, self.tok)

    def scatter_add(self, acc: jax.Array, rows: jax.Array) -> jax.Array:
        return acc.at[self.tok].add(rows.astype(acc.dtype), mode="drop")


def _active_experts(sizes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The experts with a non-empty list first ([E] ids), and how many there are: the loops
    visit only those (an empty expert still costs its weight slices and loop setup)."""
    return jnp.argsort(sizes == 0, stable=True).astype(jnp.int32), jnp.sum(sizes > 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _ffn(x: jax.Array, pairs: jax.Array, sizes: jax.Array, pair_weights: jax.Array,
         gate: jax.Array, up: jax.Array, down: jax.Array, top_k: int, limit: float,
         block: int, min_rows: int) -> jax.Array:
    n, f = x.shape[0], down.shape[1]
    starts, counts = segment_bounds(sizes)
    experts, num_active = _active_experts(sizes)

    def expert(i: jax.Array, out: jax.Array) -> jax.Array:
        e = experts[i]
        w_in, w_out = expert_in_out(gate, up, down, e)

        def visit(out: jax.Array, s: jax.Array, rows: int, mask: jax.Array | None
                  ) -> jax.Array:
            win = _Window(pairs, s, rows, mask, pair_weights, top_k, n)
            pre = f32_dot(win.gather(x), w_in)  # [rows, 2F]
            y = f32_dot(clamped_swiglu(pre[:, :f], pre[:, f:], limit).astype(x.dtype), w_out)
            return win.scatter_add(out, y * win.w[:, None].astype(jnp.float32))
        return over_windows(starts[e], counts[e], block, min_rows, pairs.shape[0], visit,
                            out)

    return lax.fori_loop(0, num_active, expert, jnp.zeros_like(x))


def _ffn_fwd(x: jax.Array, pairs: jax.Array, sizes: jax.Array, pair_weights: jax.Array,
             gate: jax.Array, up: jax.Array, down: jax.Array, top_k: int, limit: float,
             block: int, min_rows: int) -> tuple[jax.Array, tuple[Any, ...]]:
    out = _ffn(x, pairs, sizes, pair_weights, gate, up, down, top_k, limit, block, min_rows)
    return out, (x, pairs, sizes, pair_weights, gate, up, down)


def _ffn_bwd(top_k: int, limit: float, block: int, min_rows: int, res: tuple[Any, ...],
             dout: jax.Array) -> tuple[Any, ...]:
    x, pairs, sizes, pair_weights, gate, up, down = res
    (n, d), f = x.shape, down.shape[1]
    starts, counts = segment_bounds(sizes)
    swiglu = functools.partial(clamped_swiglu, limit=limit)
    experts, num_active = _active_experts(sizes)

    def expert(i: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        e = experts[i]
        w_in, w_out = expert_in_out(gate, up, down, e)

        def visit(acc: tuple[jax.Array, ...], s: jax.Array, rows: int,
                  mask: jax.Array | None) -> tuple[jax.Array, ...]:
            dx, d_pw, acc_in, acc_out = acc
            win = _Window(pairs, s, rows, mask, pair_weights, top_k, n)
            x_w, dout_w = win.gather(x), win.gather(dout).astype(jnp.float32)
            pre = f32_dot(x_w, w_in)
            h, swiglu_vjp = jax.vjp(swiglu, pre[:, :f], pre[:, f:])
            y = f32_dot(h.astype(x.dtype), w_out)
            d_pw = d_pw.at[win.pid].set(jnp.sum(dout_w * y, -1).astype(d_pw.dtype),
                                        mode="drop")
            dy = (dout_w * win.w[:, None].astype(jnp.float32)).astype(x.dtype)
            acc_out = acc_out + f32_dot(h.astype(x.dtype), dy, (0, 0))  # [F, D]
            d_gate, d_up = swiglu_vjp(f32_dot(dy, w_out, (1, 1)))  # dh = dy . down^T
            d_pre = jnp.concatenate([d_gate, d_up], axis=-1).astype(x.dtype)  # [rows, 2F]
            acc_in = acc_in + f32_dot(x_w, d_pre, (0, 0))  # [D, 2F]
            return win.scatter_add(dx, f32_dot(d_pre, w_in, (1, 1))), d_pw, acc_in, acc_out

        acc = (*carry[:2], jnp.zeros((d, 2 * f), jnp.float32), jnp.zeros((f, d), jnp.float32))
        dx, d_pw, acc_in, acc_out = over_windows(starts[e], counts[e], block, min_rows,
                                                 pairs.shape[0], visit, acc)
        per_expert = (acc_in[:, :f], acc_in[:, f:], acc_out)  # d gate_e, d up_e, d down_e
        return (dx, d_pw, *(lax.dynamic_update_index_in_dim(g, a.astype(g.dtype), e, 0)
                            for g, a in zip(carry[2:], per_expert)))

    init = tuple(jnp.zeros_like(a) for a in (x, pair_weights, gate, up, down))
    dx, d_pw, d_gate, d_up, d_down = lax.fori_loop(0, num_active, expert, init)
    return dx, None, None, d_pw, d_gate, d_up, d_down


_ffn.defvjp(_ffn_fwd, _ffn_bwd)
