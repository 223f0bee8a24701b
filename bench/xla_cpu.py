"""XLA:CPU behaviours that shaped moejax's CPU paths, each measured side by side.

    python bench/xla_cpu.py [--repeats 9] [--json]
    taskset -c 0 python bench/xla_cpu.py     # the same on one core: compare the ratios

Three comparisons, candidates of a comparison interleaved per repeat, medians of wall time:

- ffn: a SwiGLU FFN forward+backward written with 3-D activations (`[B, L, D] @ [D, F]`)
  against `layers.linear` (flattened 2-D matmuls). XLA:CPU gives the 3-D form transposing
  layout copies in the backward.
- attention: the attention core (B 8, L 256, H 4, K 48, J 32: bench/vs_hf.py's MLA shapes)
  forward+backward: `jax.nn.dot_product_attention` ("xla", v padded to K), the reference
  einsums, and `attention.heads_major_attention` (hand-written backward) on heads-major
  inputs, whole and with the causal upper triangle skipped in 2, 4 or 8 query blocks.
- loop: a `fori_loop` of [512, 256] x [256, 256] window matmuls over 16384 rows against one
  plain matmul of the same FLOPs. Run it under `taskset -c 0` and without: the loop gains
  little from the second core, the plain matmul nearly 2x (why dropless on CPU runs its
  bulk as batched matmuls, bulk_dropless.py; bench/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moejax.model.attention.core import attention_mask, heads_major_attention
from moejax.model.layers import linear
from moejax.model.attention.mla import expanded_attention, reference_attention


def interleaved(cands: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall seconds of each candidate, run once per round in turn (after warm-up)."""
    for fn in cands.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in cands}
    for _ in range(repeats):
        for name, fn in cands.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def grad_fn(fn: Callable[..., jax.Array], *args: jax.Array) -> Callable[[], Any]:
    """Jitted value-and-grad of sum(fn(*args)^2) w.r.t. every argument, as a thunk."""
    step = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a) ** 2),
                                      argnums=tuple(range(len(args)))))
    return lambda: step(*args)


def ffn_case(rng: np.random.Generator) -> dict[str, Callable[[], Any]]:
    b, length, d, f = 4, 256, 256, 1024
    x = jnp.asarray(rng.normal(size=(b, length, d)), jnp.float32)
    w = [jnp.asarray(rng.normal(size=s) * 0.05, jnp.float32) for s in [(d, f), (d, f), (f, d)]]

    def three_d(x, wg, wu, wd):
        return (jax.nn.silu(x @ wg) * (x @ wu)) @ wd

    def two_d(x, wg, wu, wd):
        return linear(jax.nn.silu(linear(x, wg)) * linear(x, wu), wd)
    return {"ffn_3d": grad_fn(three_d, x, *w), "ffn_2d_linear": grad_fn(two_d, x, *w)}


def attention_case(rng: np.random.Generator) -> dict[str, Callable[[], Any]]:
    b, length, h, k, j = 8, 256, 4, 48, 32
    q, key = (jnp.asarray(rng.normal(size=(b, length, h, k)), jnp.float32) for _ in "qk")
    v = jnp.asarray(rng.normal(size=(b, length, h, j)), jnp.float32)
    mask = attention_mask(jnp.ones((b, length), jnp.int32))
    heads = [a.transpose(0, 2, 1, 3) for a in (q, key, v)]
    return {
        "attention_xla": grad_fn(lambda q, k, v: expanded_attention(q, k, v, mask, k.shape[-1]
                                                                    ** -0.5, "xla"), q, key, v),
        "attention_reference": grad_fn(lambda q, k, v: reference_attention(
            q, k, v, mask, k.shape[-1] ** -0.5), q, key, v),
        "attention_heads_major": grad_fn(lambda q, k, v: heads_major_attention(
            q, k, v, mask, k.shape[-1] ** -0.5), *heads),
        "attention_heads_major_2_blocks": grad_fn(lambda q, k, v: heads_major_attention(
            q, k, v, mask, k.shape[-1] ** -0.5, 2), *heads),
        "attention_heads_major_4_blocks": grad_fn(lambda q, k, v: heads_major_attention(
            q, k, v, mask, k.shape[-1] ** -0.5, 4), *heads),
        "attention_heads_major_8_blocks": grad_fn(lambda q, k, v: heads_major_attention(
            q, k, v, mask, k.shape[-1] ** -0.5, 8), *heads),
    }


def loop_case(rng: np.random.Generator) -> dict[str, Callable[[], Any]]:
    rows, total = 512, 16384
    x = jnp.asarray(rng.normal(size=(total, 256)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(256, 256)) * 0.05, jnp.float32)

    @jax.jit
    def looped(x: jax.Array, w: jax.Array) -> jax.Array:
        def body(i: jax.Array, y: jax.Array) -> jax.Array:
            window = lax.dynamic_slice_in_dim(x, i * rows, rows, 0) @ w
            return lax.dynamic_update_slice_in_dim(y, window, i * rows, 0)
        return lax.fori_loop(0, total // rows, body, jnp.zeros_like(x))

    plain = jax.jit(lambda x, w: x @ w)
    return {"loop_of_window_dots": lambda: looped(x, w), "one_plain_dot": lambda: plain(x, w)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for case, make in (("ffn", ffn_case), ("attention", attention_case), ("loop", loop_case)):
        times = interleaved(make(rng), args.repeats)
        first = next(iter(times.values()))
        for name, t in times.items():
            row = {"bench": "xla_cpu", "case": case, "candidate": name, "ms": t * 1e3,
                   "ratio_to_first": t / first, "cores": len(os.sched_getaffinity(0)),
                   "load_average": os.getloadavg()[0]}
            print(json.dumps(row) if args.json else
                  f"{case:9s} {name:24s} {t * 1e3:8.2f} ms  x{t / first:.2f}  "
                  f"({row['cores']} cores)")


if __name__ == "__main__":
    main()
