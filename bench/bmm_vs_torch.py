"""XLA:CPU's batched matmuls against PyTorch's `torch.bmm`, on the routed experts' shapes.

    python bench/bmm_vs_torch.py [--shape 16,1024,256,128] [--rounds 3] [--threads 1] [--json]
    taskset -c 0 python bench/bmm_vs_torch.py       # one core for both (XLA sizes its pool
                                                    # from the affinity mask)

The three batched products of an expert projection x [E, C, D] @ w [E, D, F] in a training
step: forward x @ w, weight gradient x^T @ dy (contracting C), data gradient dy @ w^T
(contracting F). XLA runs each as one jitted `lax.dot_general`, PyTorch as `torch.bmm` on
transposed views, the way autograd calls it. Each side runs in its own subprocess (PyTorch
ran ~10x slower in a process where JAX had run, bench/vs_hf.py); the sides alternate for
`--rounds` rounds so that load drifts hit both, and each prints its medians over 15 calls.
`ratio` = XLA time / torch time, the median over rounds (> 1: XLA is slower). Default
shape: bench/vs_hf.py's experts (E 16, C = P / E = 1024, D 256, F 128).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

PRODUCTS = ("forward", "weight_grad", "data_grad")


def median_ms(fn: Callable[[], Any], calls: int = 15) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def operands(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    e, c, d, f = shape
    rng = np.random.default_rng(0)
    return (rng.standard_normal((e, c, d), np.float32), rng.standard_normal((e, d, f), np.float32),
            rng.standard_normal((e, c, f), np.float32))


def time_xla(shape: tuple[int, ...]) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    from jax import lax

    x, w, dy = (jnp.asarray(a) for a in operands(shape))

    def bmm(a: jax.Array, b: jax.Array, ca: int, cb: int) -> jax.Array:
        return lax.dot_general(a, b, (((ca,), (cb,)), ((0,), (0,))))
    fns = {"forward": (jax.jit(lambda x, w: bmm(x, w, 2, 1)), (x, w)),
           "weight_grad": (jax.jit(lambda x, dy: bmm(x, dy, 1, 1)), (x, dy)),
           "data_grad": (jax.jit(lambda dy, w: bmm(dy, w, 2, 2)), (dy, w))}
    return {k: median_ms(lambda f=f, a=a: f(*a).block_until_ready()) for k, (f, a) in fns.items()}


def time_torch(shape: tuple[int, ...], threads: int) -> dict[str, float]:
    import torch
    torch.set_num_threads(threads)
    x, w, dy = (torch.from_numpy(a) for a in operands(shape))
    fns = {"forward": lambda: torch.bmm(x, w),
           "weight_grad": lambda: torch.bmm(x.transpose(1, 2), dy),
           "data_grad": lambda: torch.bmm(dy, w.transpose(1, 2))}
    return {k: median_ms(f) for k, f in fns.items()}


def run_side(side: str, shape: str, threads: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--side", side, "--shape", shape,
                          "--threads", str(threads)], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="16,1024,256,128", help="E,C,D,F")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--side", choices=("xla", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 4:
        parser.error(f"--shape {args.shape!r}: give E,C,D,F (four integers)")
    if args.side:
        ms = time_xla(shape) if args.side == "xla" else time_torch(shape, args.threads)
        print(json.dumps(ms))
        return
    rounds = [(run_side("xla", args.shape, args.threads),
               run_side("torch", args.shape, args.threads)) for _ in range(args.rounds)]
    flops = 2 * int(np.prod(shape))
    for product in PRODUCTS:
        xla = [r[0][product] for r in rounds]
        torch_ms = [r[1][product] for r in rounds]
        row = {"product": product, "shape": args.shape, "xla_ms": statistics.median(xla),
               "torch_ms": statistics.median(torch_ms),
               "ratio": statistics.median(a / b for a, b in zip(xla, torch_ms)),
               "xla_gflops": flops / statistics.median(xla) / 1e6,
               "torch_gflops": flops / statistics.median(torch_ms) / 1e6, "rounds": args.rounds}
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{product:>12}  XLA {row['xla_ms']:7.2f} ms ({row['xla_gflops']:5.1f} GFLOP/s)"
                  f"  torch {row['torch_ms']:7.2f} ms ({row['torch_gflops']:5.1f} GFLOP/s)"
                  f"  XLA / torch {row['ratio']:.2f}", flush=True)


if __name__ == "__main__":
    main()
