"""MoE layer vs a dense SwiGLU FFN of the same active FLOPs, measured side by side.

For each (E, top-k) the routed experts have width F and the dense FFN has width k * F, so
both do the same matmul FLOPs per token (the router's D x E is extra work of the MoE).
Times are medians over repeats after a warm-up; the ratio is against the dense FFN of the
same run. Shared experts are left out: they are dense FFNs and would only dilute the ratio.

    python bench/moe_layer.py [--tokens 4096] [--dim 512] [--repeats 5] [--json]

Expert parallelism: `--expert-parallel N` runs everything on a mesh with expert=N (N fake
CPU devices when there is no accelerator; the flag must be spelled with a space, it is read
before JAX starts). Parameters and tokens are sharded by the logical rules; the default
candidates are then "index" (GSPMD inserts the all-to-all) and "ep:all_gather" (the
shard_map transport of moejax/model/moe/parallel/shard_map.py; "ep:all_gather:dropless" runs
dropless dispatch per shard; "ep:ragged" is the emulated ragged_all_to_all off gpu/tpu).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

if "--expert-parallel" in sys.argv:  # fake CPU devices must exist before JAX starts
    _DEVICES = sys.argv[sys.argv.index("--expert-parallel") + 1]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_DEVICES}")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from moejax.config import MeshConfig, MoEConfig  # noqa: E402
from moejax.model.layers import MLP  # noqa: E402
from moejax.model.moe.layer import MoE  # noqa: E402
from moejax.sharding import (active_mesh, logical_to_spec, make_mesh,  # noqa: E402
                             param_shardings, use_mesh)

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
    params, x = place_on_mesh(params, x)

    def forward(p, x):
        out = module.apply(p, x, *extra)
        return out[0] if isinstance(out, tuple) else out

    fwd = jax.jit(forward)
    fwd_bwd = jax.jit(jax.grad(lambda p, x: jnp.sum(forward(p, x) ** 2), argnums=(0, 1)))
    return {"fwd": median_ms(lambda: fwd(params, x), repeats),
            "fwd_bwd": median_ms(lambda: fwd_bwd(params, x), repeats)}


def place_on_mesh(params: Any, x: jax.Array) -> tuple[Any, jax.Array]:
    """Shards parameters and tokens by the logical rules under --expert-parallel."""
    mesh = active_mesh()
    if mesh is None:
        return params, x
    spec = logical_to_spec(("act_batch", "act_length", "act_embed"), shape=x.shape, mesh=mesh)
    return (jax.device_put(nn.unbox(params), param_shardings(params, mesh)),
            jax.device_put(x, NamedSharding(mesh, spec)))


def moe_config(dispatch: str, **fields: Any) -> MoEConfig:
    """"ep:<transport>[:<local dispatch>]" -> the shard_map expert-parallel path, running
    index (default) or dropless dispatch on each expert shard's pairs; "dropless:<backend>"
    -> dropless with that `dropless_backend` ("bulk", "loop", "ragged_dot")."""
    if dispatch.startswith("ep:"):
        transport, _, local = dispatch[3:].partition(":")
        return MoEConfig(dispatch=local or "index", expert_parallel="shard_map",
                         expert_transport=transport, **fields)
    name, _, backend = dispatch.partition(":")
    return MoEConfig(dispatch=name, dropless_backend=backend or "auto", **fields)


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
        cfg = moe_config(dispatch, num_experts=experts, top_k=top_k, expert_hidden=hidden,
                         num_shared_experts=0, capacity_factor=args.capacity_factor,
                         group_size=args.group_size)
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
    parser.add_argument("--dispatch", default=None,
                        help="default index,dropless,dropless:loop,einsum,dense; "
                        "with --expert-parallel: index,ep:all_gather")
    parser.add_argument("--expert-parallel", type=int, default=0,
                        help="N: mesh expert=N (N fake CPU devices off accelerators)")
    parser.add_argument("--max-oracle-experts", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()
    ep = args.expert_parallel
    args.dispatch = args.dispatch or ("index,ep:all_gather" if ep else
                                      "index,dropless,dropless:loop,einsum,dense")
    mesh = make_mesh(MeshConfig(data=-1, expert=ep)) if ep else None
    if not args.json:
        print(f"# {jax.devices()[0].platform}, T={args.tokens}, D={args.dim}, "
              f"cf={args.capacity_factor}, group={args.group_size}"
              + (f", mesh {dict(mesh.shape)}" if mesh else ""))
        print(f"{'impl':>22} {'E':>4} {'k':>2} {'pass':>8} {'ms':>9} {'x dense':>8}")
    with use_mesh(mesh) if mesh else contextlib.nullcontext():
        for experts, top_k, hidden in CASES:
            for row in run_case(experts, top_k, hidden, args, args.dispatch.split(",")):
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    print(f"{row['impl']:>22} {experts:>4} {top_k:>2} {row['pass']:>8} "
                          f"{row['ms']:>9.1f} {row['ratio_vs_dense']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
