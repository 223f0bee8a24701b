"""MoE layer vs a dense SwiGLU FFN of the same active FLOPs, measured side by side.

For each (E, top-k) the routed experts have width F and the dense FFN has width k * F, so
both do the same matmul FLOPs per token (the router's D x E is extra work of the MoE).
Times are medians over repeats after a warm-up; the ratio is against the dense FFN of the
same run. Shared experts are left out: they are dense FFNs and would only dilute the ratio.

    python bench/moe_layer.py [--tokens 4096] [--dim 512] [--repeats 5] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from moejax.config import MoEConfig
from moejax.model.layers import MLP
from moejax.model.moe import MoE

CASES = ((8, 2, 512), (64, 6, 256), (256, 8, 192))  # (experts, top_k, expert_hidden)


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def timed_passes(module: Any, x: jax.Array, extra: tuple, repeats: int) -> dict[str, float]:
    """Median ms of the forward and of forward+backward (grads of params and input)."""
    params = module.init(jax.random.key(0), x, *extra)

    def forward(p, x):
        out = module.apply(p, x, *extra)
        return out[0] if isinstance(out, tuple) else out

    fwd = jax.jit(forward)
    fwd_bwd = jax.jit(jax.grad(lambda p, x: jnp.sum(forward(p, x) ** 2), argnums=(0, 1)))
    return {"fwd": median_ms(lambda: fwd(params, x), repeats),
            "fwd_bwd": median_ms(lambda: fwd_bwd(params, x), repeats)}


def run_case(experts: int, top_k: int, hidden: int, args: argparse.Namespace,
             dispatches: list[str]) -> list[dict[str, Any]]:
    length = 512
    x = jax.random.normal(jax.random.key(1), (args.tokens // length, length, args.dim))
    dense = timed_passes(MLP(top_k * hidden), x, (), args.repeats)
    rows = [dict(impl="dense_ffn", experts=experts, top_k=top_k, **{"pass": p}, ms=ms,
                 ratio_vs_dense=1.0) for p, ms in dense.items()]
    bias, mask = jnp.zeros(experts), jnp.ones(x.shape[:2], bool)
    for dispatch in dispatches:
        if dispatch == "dense" and experts > args.max_oracle_experts:
            continue  # the oracle computes every expert on every token: E/k times the work
        cfg = MoEConfig(num_experts=experts, top_k=top_k, expert_hidden=hidden,
                        num_shared_experts=0, dispatch=dispatch,
                        capacity_factor=args.capacity_factor, group_size=args.group_size)
        moe = timed_passes(MoE(cfg), x, (bias, mask), args.repeats)
        rows += [dict(impl=dispatch, experts=experts, top_k=top_k, **{"pass": p}, ms=ms,
                      ratio_vs_dense=ms / dense[p]) for p, ms in moe.items()]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--group-size", type=int, default=512)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--dispatch", default="index,einsum,dense")
    parser.add_argument("--max-oracle-experts", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()
    if not args.json:
        print(f"# {jax.devices()[0].platform}, T={args.tokens}, D={args.dim}, "
              f"cf={args.capacity_factor}, group={args.group_size}")
        print(f"{'impl':>10} {'E':>4} {'k':>2} {'pass':>8} {'ms':>9} {'x dense':>8}")
    for experts, top_k, hidden in CASES:
        for row in run_case(experts, top_k, hidden, args, args.dispatch.split(",")):
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{row['impl']:>10} {experts:>4} {top_k:>2} {row['pass']:>8} "
                      f"{row['ms']:>9.1f} {row['ratio_vs_dense']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
