"""Fused grouped SwiGLU FFN for XLA:CPU: the whole expert FFN of a row window in one go.

    y[r] = swiglu(x[r] @ gate[e], x[r] @ up[e]) @ down[e]   for r in expert e's segment

x [M, D] (rows sorted by expert), gate/up [E, D, F], down [E, F, D], sizes [E] -> y [M, D];
rows past sum(sizes) are left zero. It equals three "loop" grouped matmuls
(grouped_matmul.py) with a SwiGLU between them, but walks the experts' row windows once:
a window's x @ [gate | up] (one [rows, D] x [D, 2F] dot), SwiGLU and @ down run while the
window is in cache, where the three-matmul form makes three passes over every window (and
six in the backward) and writes [M, F] intermediates between them. The VJP is written by
hand and is again one pass: per window it recomputes SwiGLU from the saved pre-activations
x @ [gate | up] ([M, 2F], the only residual besides the inputs), and accumulates the
expert's weight gradients in the loop carry.

Windows are those of grouped_matmul's "loop" backend (`over_windows`): full windows of
`block` rows, the remainder in windows of min_rows * 2^j rows, and one masked last window.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from moejax.model.moe.grouped_matmul import over_windows, segment_bounds
from moejax.model.layers import clamped_swiglu


def grouped_swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
                   sizes: jax.Array, limit: float = 0.0, block: int = 512,
                   min_rows: int = 32) -> jax.Array:
    """x [M, D] sorted by expert, gate/up [E, D, F], down [E, F, D], sizes [E] -> [M, D].

    `limit` is the SwiGLU clamp (layers.clamped_swiglu); `block` and `min_rows` the largest
    and smallest row windows.
    """
    block = max(1, min(block, x.shape[0]))
    return _ffn(x, gate.astype(x.dtype), up.astype(x.dtype), down.astype(x.dtype),
                sizes.astype(jnp.int32), float(limit), block, max(1, min(min_rows, block)))


def _rows(a: jax.Array, s: jax.Array, rows: int) -> jax.Array:
    return lax.dynamic_slice_in_dim(a, s, rows, 0)


def _keep(new: jax.Array, old: jax.Array, mask: jax.Array | None) -> jax.Array:
    """new where the window's rows are in the segment, old elsewhere (mask None: all in)."""
    return new if mask is None else jnp.where(mask[:, None], new, old)


def f32_dot(a: jax.Array, b: jax.Array, contract: tuple[int, int] = (1, 0)) -> jax.Array:
    """a . b contracting dims `contract` (one each), accumulated and returned in fp32."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def expert_in_out(gate: jax.Array, up: jax.Array, down: jax.Array, e: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    """Expert e's [gate_e | up_e] [D, 2F] (one dot for both) and down_e [F, D]."""
    return jnp.concatenate([gate[e], up[e]], axis=-1), down[e]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _ffn(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, sizes: jax.Array,
         limit: float, block: int, min_rows: int) -> jax.Array:
    return _ffn_fwd(x, gate, up, down, sizes, limit, block, min_rows)[0]


def _ffn_fwd(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
             sizes: jax.Array, limit: float, block: int, min_rows: int
             ) -> tuple[jax.Array, tuple[Any, ...]]:
    m, f = x.shape[0], down.shape[1]
    starts, counts = segment_bounds(sizes)

    def expert(e: jax.Array, carry: tuple[jax.Array, jax.Array]
               ) -> tuple[jax.Array, jax.Array]:
        w_in, w_out = expert_in_out(gate, up, down, e)

        def visit(carry: tuple[jax.Array, jax.Array], s: jax.Array, rows: int,
                  mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
            y, pre = carry
            pre_w = f32_dot(_rows(x, s, rows), w_in)  # [rows, 2F]
            h = clamped_swiglu(pre_w[:, :f], pre_w[:, f:], limit).astype(x.dtype)
            y_w = f32_dot(h, w_out).astype(y.dtype)
            y_w, pre_w = _keep(y_w, _rows(y, s, rows), mask), _keep(
                pre_w.astype(pre.dtype), _rows(pre, s, rows), mask)
            return (lax.dynamic_update_slice_in_dim(y, y_w, s, 0),
                    lax.dynamic_update_slice_in_dim(pre, pre_w, s, 0))
        return over_windows(starts[e], counts[e], block, min_rows, m, visit, carry)

    init = (jnp.zeros((m, x.shape[1]), x.dtype), jnp.zeros((m, 2 * f), x.dtype))
    y, pre = lax.fori_loop(0, gate.shape[0], expert, init)
    return y, (x, gate, up, down, sizes, pre)


def _ffn_bwd(limit: float, block: int, min_rows: int, res: tuple[Any, ...], dy: jax.Array
             ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, None]:
    x, gate, up, down, sizes, pre = res
    (m, d), (num_experts, f) = x.shape, down.shape[:2]
    starts, counts = segment_bounds(sizes)
    swiglu = functools.partial(clamped_swiglu, limit=limit)

    def expert(e: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        w_in, w_out = expert_in_out(gate, up, down, e)

        def visit(carry: tuple[jax.Array, jax.Array, jax.Array], s: jax.Array, rows: int,
                  mask: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
            dx, acc_in, acc_out = carry
            dy_w = _rows(dy, s, rows)
            if mask is not None:  # rows of other experts must not reach this one's grads
                dy_w = jnp.where(mask[:, None], dy_w, 0)
            x_w, pre_w = _rows(x, s, rows), _rows(pre, s, rows).astype(jnp.float32)
            h, swiglu_vjp = jax.vjp(swiglu, pre_w[:, :f], pre_w[:, f:])
            acc_out = acc_out + f32_dot(h.astype(x.dtype), dy_w, (0, 0))  # [F, D]
            d_gate, d_up = swiglu_vjp(f32_dot(dy_w, w_out, (1, 1)))  # dh = dy . down^T
            d_pre = jnp.concatenate([d_gate, d_up], axis=-1).astype(x.dtype)  # [rows, 2F]
            acc_in = acc_in + f32_dot(x_w, d_pre, (0, 0))  # [D, 2F]
            dx_w = _keep(f32_dot(d_pre, w_in, (1, 1)).astype(dx.dtype), _rows(dx, s, rows), mask)
            return lax.dynamic_update_slice_in_dim(dx, dx_w, s, 0), acc_in, acc_out

        dx, grads = carry[0], carry[1:]
        acc = (dx, jnp.zeros((d, 2 * f), jnp.float32), jnp.zeros((f, d), jnp.float32))
        dx, acc_in, acc_out = over_windows(starts[e], counts[e], block, min_rows, m, visit,
                                            acc)
        per_expert = (acc_in[:, :f], acc_in[:, f:], acc_out)  # d gate_e, d up_e, d down_e
        return (dx, *(lax.dynamic_update_index_in_dim(g, a.astype(g.dtype), e, 0)
                      for g, a in zip(grads, per_expert)))

    init = tuple(jnp.zeros_like(a) for a in (x, gate, up, down))
    dx, d_gate, d_up, d_down = lax.fori_loop(0, num_experts, expert, init)
    return dx, d_gate, d_up, d_down, None


_ffn.defvjp(_ffn_fwd, _ffn_bwd)
