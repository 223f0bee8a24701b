"""bench/moe_layer.py's comparison, but interleaved: robust on a shared, loaded machine.

moe_layer.py times each candidate's repeats back to back, so a load change between two
candidates (minutes apart) moves their ratio. Here every round runs every candidate once,
one after the other, and both the wall time and this process's CPU time are kept; the
ratios of the minima and of the medians are printed. Same shapes as moe_layer.py.

    python bench/moe_layer_interleaved.py [--experts 64 --top-k 6 --hidden 256]
        [--dispatch index,dropless,dropless:loop] [--rounds 5] [--passes fwd,fwd_bwd] [--json]

A dispatch "dropless:B" runs dropless with `model.moe.dropless_backend` B.
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
from moejax.model.moe.layer import MoE


def compiled(module: Any, x: jax.Array, extra: tuple, passes: list[str]
             ) -> dict[str, Callable[[], Any]]:
    """Warmed-up thunks running the forward / forward+backward of `module` on x."""
    params = module.init(jax.random.key(0), x, *extra)

    def forward(p: Any, x: jax.Array) -> jax.Array:
        out = module.apply(p, x, *extra)
        return out[0] if isinstance(out, tuple) else out

    fns = {"fwd": jax.jit(forward),
           "fwd_bwd": jax.jit(jax.grad(lambda p, x: jnp.sum(forward(p, x) ** 2), (0, 1)))}
    thunks = {p: (lambda f=fns[p]: f(params, x)) for p in passes}
    for thunk in thunks.values():
        jax.block_until_ready(thunk())
    return thunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dispatch", default="index,dropless,dropless:loop")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--passes", default="fwd,fwd_bwd")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()
    passes = args.passes.split(",")
    x = jax.random.normal(jax.random.key(1), (args.tokens // 512, 512, args.dim))
    bias, mask = jnp.zeros(args.experts), jnp.ones(x.shape[:2], bool)
    thunks = {"dense_ffn": compiled(MLP(args.top_k * args.hidden), x, (), passes)}
    for name in args.dispatch.split(","):  # "dropless:loop" = dropless_backend "loop"
        dispatch, _, backend = name.partition(":")
        cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k, expert_hidden=args.hidden,
                        num_shared_experts=0, dispatch=dispatch,
                        dropless_backend=backend or "auto")
        thunks[name] = compiled(MoE(cfg), x, (bias, mask), passes)
    times: dict[tuple[str, str], list[tuple[float, float]]] = {
        (n, p): [] for n in thunks for p in passes}
    for _ in range(args.rounds):
        for name, by_pass in thunks.items():
            for p, thunk in by_pass.items():
                cpu, wall = time.process_time(), time.perf_counter()
                jax.block_until_ready(thunk())
                times[name, p].append(((time.perf_counter() - wall) * 1e3,
                                       (time.process_time() - cpu) * 1e3))
    for p in passes:
        for name in thunks:
            row: dict[str, Any] = dict(impl=name, experts=args.experts, top_k=args.top_k,
                                       **{"pass": p})
            for i, clock in enumerate(("wall", "cpu")):
                ms = [t[i] for t in times[name, p]]
                ref = [t[i] for t in times["dense_ffn", p]]
                row[f"{clock}_min_ms"] = min(ms)
                row[f"{clock}_min_ratio"] = min(ms) / min(ref)
                row[f"{clock}_median_ratio"] = statistics.median(ms) / statistics.median(ref)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{name:>10} E={args.experts:<4} {p:>8}  wall min {row['wall_min_ms']:7.0f}"
                      f" ms  x dense: min {row['wall_min_ratio']:.2f} median "
                      f"{row['wall_median_ratio']:.2f} | cpu min {row['cpu_min_ratio']:.2f} "
                      f"median {row['cpu_median_ratio']:.2f}", flush=True)


if __name__ == "__main__":
    main()
