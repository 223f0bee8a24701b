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

`overflow_forward` and `overflow_backward` add into given outputs and gradients, so that
bulk_dropless.py can start them from the bulk's: the weight gradients then get no
[E, D, F] zero fill and no [E, D, F] sum of two gradients (at E = 256 these were ~7 % of
a profile's thread-summed time for the layer's fwd+bwd; bench/README.md). `overflow_swiglu`
is the stand-alone op (zeros to start from).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from moejax.model.moe.cpu.grouped_ffn import expert_in_out, f32_dot
from moejax.model.moe.grouped_matmul import over_windows, segment_bounds
from moejax.model.layers import clamped_swiglu
from moejax.model.moe.row_gather import take_rows


class Loop(NamedTuple):
    """The static settings of the overflow loops (hashable: a custom_vjp nondiff arg)."""
    top_k: int
    limit: float  # SwiGLU clamp, layers.clamped_swiglu
    block: int  # largest row window
    min_rows: int  # smallest row window


Grads = tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]  # x, w, gate, up, down


def overflow_swiglu(x: jax.Array, pairs: jax.Array, sizes: jax.Array,
                    pair_weights: jax.Array, top_k: int, gate: jax.Array, up: jax.Array,
                    down: jax.Array, limit: float = 0.0, block: int = 256,
                    min_rows: int = 16) -> jax.Array:
    """x [N, D], pairs [V], sizes [E], pair_weights [P] -> out [N, D] (module doc).

    `limit` is the SwiGLU clamp (layers.clamped_swiglu); `block` and `min_rows` the largest
    and smallest row windows.
    """
    weights = tuple(w.astype(x.dtype) for w in (gate, up, down))
    return _ffn(x, pairs.astype(jnp.int32), sizes.astype(jnp.int32), pair_weights, weights,
                loop_settings(pairs.shape[0], top_k, limit, block, min_rows))


def loop_settings(num_listed: int, top_k: int, limit: float = 0.0, block: int = 256,
                  min_rows: int = 16) -> Loop:
    """Loop with the windows clamped to the list length V (num_listed)."""
    block = max(1, min(block, num_listed))
    return Loop(top_k, float(limit), block, max(1, min(min_rows, block)))


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


def overflow_forward(x: jax.Array, pairs: jax.Array, sizes: jax.Array,
                     pair_weights: jax.Array, weights: tuple[jax.Array, ...], out: jax.Array,
                     loop: Loop) -> jax.Array:
    """out [N, D] plus every listed pair's w * FFN(x[n]), scatter-added into its token row."""
    n, f = x.shape[0], weights[2].shape[1]
    starts, counts = segment_bounds(sizes)
    experts, num_active = _active_experts(sizes)

    def expert(i: jax.Array, out: jax.Array) -> jax.Array:
        e = experts[i]
        w_in, w_out = expert_in_out(*weights, e)

        def visit(out: jax.Array, s: jax.Array, rows: int, mask: jax.Array | None
                  ) -> jax.Array:
            win = _Window(pairs, s, rows, mask, pair_weights, loop.top_k, n)
            pre = f32_dot(win.gather(x), w_in)  # [rows, 2F]
            h = clamped_swiglu(pre[:, :f], pre[:, f:], loop.limit).astype(x.dtype)
            return win.scatter_add(out, f32_dot(h, w_out) * win.w[:, None].astype(jnp.float32))
        return over_windows(starts[e], counts[e], loop.block, loop.min_rows, pairs.shape[0],
                            visit, out)

    return lax.fori_loop(0, num_active, expert, out)


def overflow_backward(x: jax.Array, pairs: jax.Array, sizes: jax.Array,
                      pair_weights: jax.Array, weights: tuple[jax.Array, ...],
                      dout: jax.Array, grads: Grads, loop: Loop) -> Grads:
    """grads (dx, d pair_weights, d gate, d up, d down) plus the listed pairs' share.

    Recomputes each window's FFN (no residuals). dx and the weight gradients are added to
    (an expert's slice is read, added to and written back); d pair_weights is set at the
    listed pairs, which no other path may also touch.
    """
    (n, d), f = x.shape, weights[2].shape[1]
    starts, counts = segment_bounds(sizes)
    swiglu = functools.partial(clamped_swiglu, limit=loop.limit)
    experts, num_active = _active_experts(sizes)

    def expert(i: jax.Array, carry: Grads) -> Grads:
        e = experts[i]
        w_in, w_out = expert_in_out(*weights, e)

        def visit(acc: tuple[jax.Array, ...], s: jax.Array, rows: int,
                  mask: jax.Array | None) -> tuple[jax.Array, ...]:
            dx, d_pw, acc_in, acc_out = acc
            win = _Window(pairs, s, rows, mask, pair_weights, loop.top_k, n)
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
        dx, d_pw, acc_in, acc_out = over_windows(starts[e], counts[e], loop.block,
                                                 loop.min_rows, pairs.shape[0], visit, acc)
        per_expert = (acc_in[:, :f], acc_in[:, f:], acc_out)  # d gate_e, d up_e, d down_e
        return (dx, d_pw, *(_add_to_slice(g, a, e) for g, a in zip(carry[2:], per_expert)))

    return lax.fori_loop(0, num_active, expert, grads)


def _add_to_slice(g: jax.Array, a: jax.Array, e: jax.Array) -> jax.Array:
    """g[e] += a, in place in the loop carry."""
    return lax.dynamic_update_index_in_dim(
        g, lax.dynamic_index_in_dim(g, e, 0, keepdims=False) + a.astype(g.dtype), e, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ffn(x: jax.Array, pairs: jax.Array, sizes: jax.Array, pair_weights: jax.Array,
         weights: tuple[jax.Array, ...], loop: Loop) -> jax.Array:
    return overflow_forward(x, pairs, sizes, pair_weights, weights, jnp.zeros_like(x), loop)


def _ffn_fwd(x: jax.Array, pairs: jax.Array, sizes: jax.Array, pair_weights: jax.Array,
             weights: tuple[jax.Array, ...], loop: Loop) -> tuple[jax.Array, tuple[Any, ...]]:
    out = _ffn(x, pairs, sizes, pair_weights, weights, loop)
    return out, (x, pairs, sizes, pair_weights, weights)


def _ffn_bwd(loop: Loop, res: tuple[Any, ...], dout: jax.Array) -> tuple[Any, ...]:
    x, pairs, sizes, pair_weights, weights = res
    zeros = tuple(jnp.zeros_like(a) for a in (x, pair_weights, *weights))
    dx, d_pw, *d_weights = overflow_backward(x, pairs, sizes, pair_weights, weights, dout,
                                             zeros, loop)
    return dx, None, None, d_pw, tuple(d_weights)


_ffn.defvjp(_ffn_fwd, _ffn_bwd)
