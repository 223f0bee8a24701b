"""Grouped matmul: rows sorted by group, every group times its own weight matrix.

    y[r] = x[r] @ w[e]   for r in group e's segment [start_e, start_e + sizes[e])

x [M, K] (rows sorted by group), w [E, K, N], sizes [E] -> y [M, N]; start_e is the sum
of the sizes before e, and rows past sum(sizes) are left zero. This is the expert
computation of a dropless MoE (M = routed pairs, K/N = D/F or F/D).

Backends (`backend=None` picks by platform, see `default_backend`):

- "ragged_dot": `jax.lax.ragged_dot` and its own autodiff. The native path on GPU/TPU.
  XLA:CPU lowers it densely (reported ~50x a dense FFN's forward), so on CPU it is used
  only to test it.
- "loop": for XLA:CPU, the per-matmul building block (dropless's "loop" backend runs
  the fused whole-FFN version, cpu/grouped_ffn.py; its CPU default "bulk" runs the overflow
  with it, cpu/overflow_ffn.py). A loop over groups; each segment is cut into windows of
  `block` rows, then windows of min_rows * 2^j rows (largest below `block` first) for
  the remainder and one last masked window of min_rows rows (`over_windows`). A window is a
  dynamic slice of x times the group's [K, N] weights (one plain matmul), written back
  with the rows outside the segment masked. The VJP is written by hand
  (`jax.custom_vjp`): dx is the same loop with w transposed, and dw[e] = sum over e's
  windows of x_w^T dy_w, accumulated in the loop carry and written once per group.
  Autodiff of a loop instead saves every window and scatters the weight gradients back
  (reported 10-87x slower for a scanned dropless layout).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

BACKENDS = ("ragged_dot", "loop")
NATIVE_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")  # where ragged_dot has a real kernel


def platform_of(x: jax.Array) -> str:
    """Platform of a concrete array's devices; inside a trace, the default backend's."""
    try:
        return next(iter(x.devices())).platform
    except Exception:  # noqa: BLE001 - tracers have no devices
        return jax.default_backend()


def default_backend(platform: str) -> str:
    """"ragged_dot" on GPU/TPU, "loop" everywhere else (XLA:CPU)."""
    return "ragged_dot" if platform in NATIVE_PLATFORMS else "loop"


def grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array, backend: str | None = None,
                   block: int = 512, min_rows: int = 32) -> jax.Array:
    """x [M, K] sorted by group, w [E, K, N], sizes [E] int32 -> y [M, N] (see module doc).

    "loop" only: `block` is the largest row window, `min_rows` the smallest.
    """
    backend = backend or default_backend(platform_of(x))
    if backend == "ragged_dot":
        return lax.ragged_dot(x, w.astype(x.dtype), sizes.astype(jnp.int32))
    if backend == "loop":
        block = max(1, min(block, x.shape[0]))
        return loop_gmm(x, w.astype(x.dtype), sizes.astype(jnp.int32), block,
                        max(1, min(min_rows, block)))
    raise ValueError(f"grouped matmul backend {backend!r}: use one of {list(BACKENDS)}.")


Visit = Callable[[Any, jax.Array, int, jax.Array | None], Any]  # acc: an array or a tuple


def over_windows(start: jax.Array, size: jax.Array, block: int, min_rows: int, total: int,
                  visit: Visit, acc: Any) -> Any:
    """acc = visit(acc, s, rows, mask) for the windows covering rows [start, start + size).

    size // block full windows, then the remainder r < block as a binary decomposition in
    windows of min_rows * 2^j rows, from the largest below block down to min_rows (mask
    None: all rows inside; block need not be a power of two times min_rows), and a last
    window of min_rows rows for what is left (< min_rows), whose start is
    clamped into [0, total - rows] and whose mask [rows] marks the rows inside the segment.
    Every window is a while loop of 0 or more trips, never a conditional: a conditional
    would copy the carried [M, N] output on every call instead of updating it in place.
    """
    def windows(acc: Any, s: jax.Array, count: jax.Array, rows: int) -> Any:
        return lax.fori_loop(0, count, lambda j, a: visit(a, s + j * rows, rows, None), acc)

    full = size // block
    acc = windows(acc, start, full, block)
    s, rest = start + full * block, size - full * block
    smallest = rows = min(min_rows, block)
    while rows * 2 < block:  # the ladder smallest * 2^j must cover any rest < block
        rows *= 2
    while rows >= smallest:
        take = (rest >= rows).astype(jnp.int32)
        acc = windows(acc, s, take, rows)
        s, rest, rows = s + take * rows, rest - take * rows, rows // 2

    def last(j: jax.Array, a: Any) -> Any:
        at = jnp.clip(s, 0, total - smallest)
        r = at + jnp.arange(smallest)
        return visit(a, at, smallest, (r >= s) & (r < start + size))
    return lax.fori_loop(0, (rest > 0).astype(jnp.int32), last, acc)


def segment_bounds(sizes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sizes [E] -> (start of each group's segment, its size)."""
    ends = jnp.cumsum(sizes)
    return ends - sizes, sizes


def _gmm(x: jax.Array, w: jax.Array, sizes: jax.Array, block: int, min_rows: int,
         transpose: bool) -> jax.Array:
    """The forward loop: y = x @ w[e] per segment ([E, K, N]; with transpose, w[e]^T)."""
    m, k = x.shape
    n = w.shape[1] if transpose else w.shape[2]
    starts, counts = segment_bounds(sizes)
    contract = (((1,), (1,)), ((), ())) if transpose else (((1,), (0,)), ((), ()))

    def expert(e: jax.Array, y: jax.Array) -> jax.Array:
        we = lax.dynamic_index_in_dim(w, e, keepdims=False)

        def visit(y: jax.Array, s: jax.Array, rows: int, mask: jax.Array | None) -> jax.Array:
            xw = lax.dynamic_slice(x, (s, 0), (rows, k))
            yw = lax.dot_general(xw, we, contract, preferred_element_type=jnp.float32)
            yw = yw.astype(y.dtype)
            if mask is not None:
                yw = jnp.where(mask[:, None], yw, lax.dynamic_slice(y, (s, 0), (rows, n)))
            return lax.dynamic_update_slice(y, yw, (s, 0))
        return over_windows(starts[e], counts[e], block, min_rows, m, visit, y)

    return lax.fori_loop(0, w.shape[0], expert, jnp.zeros((m, n), x.dtype))


def _gmm_dw(x: jax.Array, dy: jax.Array, sizes: jax.Array, block: int, min_rows: int
            ) -> jax.Array:
    """dw[e] = x_e^T dy_e over e's segment: x [M, K], dy [M, N] -> [E, K, N] (fp32 sums)."""
    m, k = x.shape
    n = dy.shape[1]
    starts, counts = segment_bounds(sizes)

    def visit(acc: jax.Array, s: jax.Array, rows: int, mask: jax.Array | None) -> jax.Array:
        xw = lax.dynamic_slice(x, (s, 0), (rows, k))
        dyw = lax.dynamic_slice(dy, (s, 0), (rows, n))
        if mask is not None:
            dyw = jnp.where(mask[:, None], dyw, 0)
        return acc + lax.dot_general(xw, dyw, (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

    def expert(e: jax.Array, dw: jax.Array) -> jax.Array:
        acc = over_windows(starts[e], counts[e], block, min_rows, m, visit,
                            jnp.zeros((k, n), jnp.float32))
        return lax.dynamic_update_index_in_dim(dw, acc.astype(dw.dtype), e, 0)

    return lax.fori_loop(0, sizes.shape[0], expert,
                         jnp.zeros((sizes.shape[0], k, n), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def loop_gmm(x: jax.Array, w: jax.Array, sizes: jax.Array, block: int, min_rows: int
             ) -> jax.Array:
    """The "loop" backend: x [M, K], w [E, K, N], sizes [E] -> [M, N]; hand-written VJP."""
    return _gmm(x, w, sizes, block, min_rows, transpose=False)


def _loop_gmm_fwd(x: jax.Array, w: jax.Array, sizes: jax.Array, block: int, min_rows: int
                  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    return _gmm(x, w, sizes, block, min_rows, transpose=False), (x, w, sizes)


def _loop_gmm_bwd(block: int, min_rows: int, res: tuple[jax.Array, jax.Array, jax.Array],
                  dy: jax.Array) -> tuple[jax.Array, jax.Array, None]:
    x, w, sizes = res
    dx = _gmm(dy, w, sizes, block, min_rows, transpose=True)  # dy [M, N] . w[e]^T -> [M, K]
    return dx, _gmm_dw(x, dy, sizes, block, min_rows).astype(w.dtype), None


loop_gmm.defvjp(_loop_gmm_fwd, _loop_gmm_bwd)
