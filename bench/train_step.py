"""Whole-train-step benchmark: the jitted step train.py runs, on synthetic batches.

    python bench/train_step.py --config configs/tiny.py [--config.train.batch_size=8 ...]
    python bench/train_step.py --config configs/tiny.py --compare model.remat_policy=none,full
    python bench/train_step.py --config configs/small.py --json

The step is `moejax.train.make_train_step` (the same jit, shardings and donation as
`train.py`) over a state from `moejax.train.init_state`; the batch is random tokens of the
config's [train.batch_size, train.seq_len] shape, every row one packed document. The step
is compiled ahead of time (`compile_seconds` = trace + lower + XLA compile), run
`--warmup` times, then `--repeats` times; times are medians. With `--compare KEY=a,b,..`
each value is a variant of the same config; all are compiled first, then timed in
alternating rounds (A B A B ...) so that load drifts hit every variant, and `ratio` is a
variant's median step time over the first variant's.

Reported per variant (`--json`: one object per line):
  step_time_ms, tokens_per_second  median step; tokens = batch_size * seq_len
  flops_per_token                  `moejax.train.flops_per_token` (what train.py's MFU uses)
  plan_flops_per_token             `moejax.plan` (counted from the parameter shapes)
  peak_flops                       measured here: median FLOP/s of a `--peak-size`^3 jitted
                                   matmul in the model's compute dtype, per device
  mfu                              flops_per_token * tokens_per_second / (peak_flops * devices)
  table_peak_flops, table_mfu      against `peak_flops_per_device` (data sheet / CPU guess)
  step_cpu_ms                      median process CPU time of a step (all threads)
  compile_seconds, compile_cpu_seconds   wall and process CPU time of trace+lower+compile
  peak_memory_bytes, memory_source device `memory_stats()["peak_bytes_in_use"]` where the
                                   backend has it, else the process's host RSS high-water
                                   mark ("host_rss_maxrss": process-wide, all variants)
  compiled_memory_bytes            XLA's memory analysis of this executable:
                                   arguments + outputs + temporaries - donated aliases
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import Config, load_config, resolve
from moejax.plan import plan
from moejax.sharding import make_mesh, use_mesh
from moejax.train import (flops_per_token, global_batch, init_state, make_setup,
                          make_train_step, peak_flops_per_device)
from moejax.train.loop import rng_keys
from moejax.train.step import batch_sharding


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` (blocked until ready) over `repeats` after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_flops(dtype: str, size: int, repeats: int = 5) -> float:
    """Measured FLOP/s of one device: a jitted [size, size] @ [size, size] in `dtype`."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    return 2 * size ** 3 / median_seconds(lambda: matmul(a, b), repeats, warmup=2)


def peak_memory() -> tuple[int, str]:
    """(bytes, source): device peak bytes in use where known, else host RSS high-water."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device_peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host_rss_maxrss"


def compiled_memory(compiled: Any) -> int | None:
    """Arguments + outputs + temporaries - aliased (donated) bytes of an executable."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def synthetic_batch(cfg: Config, sharding: jax.sharding.Sharding, seed: int = 0
                    ) -> dict[str, jax.Array]:
    """Random tokens [batch_size, seq_len], one document per row, laid out like train.py's."""
    t = cfg.train
    rng = np.random.default_rng(seed)
    host = {"tokens": rng.integers(0, cfg.model.vocab_size, (t.batch_size, t.seq_len),
                                   dtype=np.int32),
            "segment_ids": np.ones((t.batch_size, t.seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(t.seq_len, dtype=np.int32),
                                         (t.batch_size, t.seq_len)).copy()}
    return global_batch(host, sharding)


class StepRunner:
    """One variant: its compiled train step, its state and batch; `step()` runs one step."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.mesh = make_mesh(cfg.mesh)
        with use_mesh(self.mesh):
            start = time.perf_counter()
            setup = make_setup(cfg, self.mesh)
            init_key, self.seed_key = rng_keys(cfg)
            self.state = init_state(setup, init_key)
            self.batch = synthetic_batch(cfg, batch_sharding(self.mesh, cfg.train.batch_size,
                                                             cfg.train.seq_len))
            self.init_seconds = time.perf_counter() - start
            start, cpu = time.perf_counter(), time.process_time()
            self.compiled = make_train_step(setup, cfg).lower(
                self.state, self.batch, self.seed_key).compile()
            self.compile_seconds = time.perf_counter() - start
            self.compile_cpu_seconds = time.process_time() - cpu
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.metrics: dict[str, float] = {}

    def step(self) -> float:
        """Runs one step to completion; returns its wall time in seconds.

        The process CPU time of the step (all threads) is appended to `cpu_times`: on a
        shared machine it moves less with the load than the wall time does.
        """
        start, cpu = time.perf_counter(), time.process_time()
        self.state, metrics = self.compiled(self.state, self.batch, self.seed_key)
        jax.block_until_ready((self.state, metrics))
        elapsed = time.perf_counter() - start
        self.cpu_times.append(time.process_time() - cpu)
        self.metrics = {"loss": float(metrics["loss"])}
        return elapsed


def variant_configs(path: str, overrides: list[str], compare: str | None
                    ) -> list[tuple[str, Any]]:
    """[(label, ConfigDict)]: one per --compare value, or the config alone."""
    if not compare:
        return [("", load_config(path, overrides))]
    key, values = compare.split("=", 1)
    return [(f"{key}={v}", load_config(path, [*overrides, f"{key}={v}"]))
            for v in values.split(",")]


def run(path: str, overrides: list[str], compare: str | None, warmup: int, repeats: int,
        peak_size: int) -> list[dict[str, Any]]:
    """Builds, compiles and times every variant; returns one result dict per variant."""
    variants = [(label, cd, resolve(cd)) for label, cd in variant_configs(path, overrides,
                                                                           compare)]
    runners = [StepRunner(cfg) for _, _, cfg in variants]
    for r in runners:
        for _ in range(warmup):
            r.step()
    for _ in range(repeats):  # alternate so that load drifts hit every variant alike
        for r in runners:
            r.times.append(r.step())
    peak = matmul_peak_flops(variants[0][2].model.dtype, peak_size)
    memory, source = peak_memory()
    devices = jax.device_count()
    base = statistics.median(runners[0].times)
    results = []
    for (label, cd, cfg), r in zip(variants, runners):
        t = statistics.median(r.times)
        tokens = cfg.train.batch_size * cfg.train.seq_len
        fpt = flops_per_token(cfg.model, cfg.train.seq_len)
        table_peak = peak_flops_per_device(override=cfg.train.peak_flops_per_device)
        results.append({
            "config": path, "variant": label, "overrides": overrides,
            "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
            "devices": devices, "dtype": cfg.model.dtype, "remat_policy": cfg.model.remat_policy,
            "dispatch": cfg.model.moe.dispatch, "batch_size": cfg.train.batch_size,
            "seq_len": cfg.train.seq_len, "step_time_ms": t * 1e3,
            "step_time_ms_min": min(r.times) * 1e3, "tokens_per_second": tokens / t,
            "ratio": t / base, "flops_per_token": fpt,
            "plan_flops_per_token": plan(cd)["flops_per_token"], "peak_flops": peak,
            "mfu": fpt * tokens / t / (peak * devices), "table_peak_flops": table_peak,
            "table_mfu": fpt * tokens / t / (table_peak * devices),
            "step_cpu_ms": statistics.median(r.cpu_times[-repeats:]) * 1e3,
            "compile_seconds": r.compile_seconds, "compile_cpu_seconds": r.compile_cpu_seconds,
            "init_seconds": r.init_seconds, "load_average": os.getloadavg()[0],
            "peak_memory_bytes": memory, "memory_source": source,
            "compiled_memory_bytes": compiled_memory(r.compiled),
            "final_loss": r.metrics.get("loss"), "warmup": warmup, "repeats": repeats})
    return results


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(flags, config overrides 'a.b=value' from the --config.a.b=value arguments)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.py", help="configs/x.py[:arg]")
    parser.add_argument("--compare", default=None, help="KEY=v1,v2,...: variants timed alike")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--peak-size", type=int, default=None,
                        help="matmul size for peak_flops (default 2048 CPU, 8192 else)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    if args.peak_size is None:
        args.peak_size = 2048 if jax.devices()[0].platform == "cpu" else 8192
    return args, overrides


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    results = run(args.config, overrides, args.compare, args.warmup, args.repeats,
                  args.peak_size)
    for row in results:
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            name = row["variant"] or row["config"]
            print(f"{name}: {row['step_time_ms']:.1f} ms/step, "
                  f"{row['tokens_per_second']:,.0f} tokens/s, mfu {row['mfu']:.3f} "
                  f"(peak {row['peak_flops'] / 1e9:,.1f} GFLOP/s), x{row['ratio']:.2f}, "
                  f"compile {row['compile_seconds']:.1f} s, "
                  f"memory {row['peak_memory_bytes'] / 2**20:,.0f} MiB "
                  f"({row['memory_source']}), "
                  f"compiled {(row['compiled_memory_bytes'] or 0) / 2**20:,.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
