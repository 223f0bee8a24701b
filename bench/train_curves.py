"""Shared pieces of the training-curve benchmarks (bench/arch_efficiency.py).

    trainer = CompiledTrainer(cfg)                 # builds and jits once per config
    points = trainer.run(seed, eval_every, on_point)   # one seed; reuses the compiled steps
    flops = flops_to_target(points, target)        # where the validation curve crosses

`CompiledTrainer` drives moejax's own train step (`moejax.train.make_train_step`) and
held-out evaluation (`moejax.train.heldout.HeldOut`) without the host loop's checkpoints,
so several seeds of one config share one compilation. Every run reads the same training
batches (the data config fixes them) and is evaluated on the same validation batches; the
seed changes the parameter init and the per-step RNG.

Wall and CPU times are measured around the train steps only (validation and the first,
compiling step excluded; the compile is timed on its own).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import jax

from moejax import data as moedata
from moejax.config import Config
from moejax.distributed import BatchLayout
from moejax.sharding import make_mesh, use_mesh
from moejax.train import check_inputs, init_state, make_setup, make_train_step
from moejax.train.heldout import HeldOut
from moejax.train.metrics import flops_per_token
from moejax.train.step import batch_sharding

Point = dict[str, float]


class _CachedHeldOut(HeldOut):
    """HeldOut whose validation batches are read once and kept (same batches every time)."""

    def batches(self) -> Any:
        if not hasattr(self, "_cache"):
            self._cache = list(super().batches())
        return iter(self._cache)


class CompiledTrainer:
    """One config's train step and validation step, compiled once, run for many seeds."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.train
        self.tokenizer, summary = check_inputs(cfg)
        self.mesh = make_mesh(cfg.mesh)
        with use_mesh(self.mesh):
            self.setup = make_setup(cfg, self.mesh)
            self.step = make_train_step(self.setup, cfg)
            self.heldout = _CachedHeldOut(self.setup, cfg, self.tokenizer,
                                          min(t.eval_batches, summary.validation_batches))
        self.layout = BatchLayout(batch_sharding(self.mesh, t.batch_size, t.seq_len),
                                  t.batch_size, t.seq_len)
        self.tokens_per_step = t.batch_size * t.seq_len
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len)
        self.compile_s = 0.0  # wall seconds of the first (compiling) step, once per config
        self.compile_cpu_s = 0.0  # its CPU seconds (all threads of this process)

    def point(self, state: Any, step: int, times: dict[str, float]) -> Point:
        bpb = self.heldout(state)["validation/bits_per_byte"]
        tokens = step * self.tokens_per_step
        return {"step": step, "tokens": tokens, "train_flops": tokens * self.flops_per_token,
                "bits_per_byte": bpb, **times}

    def run(self, seed: int, eval_every: int,
            on_point: Callable[[Point], None] = lambda p: None) -> list[Point]:
        """Trains from a fresh init (train.seed = `seed`) for train.steps steps, evaluating
        every `eval_every` steps and at the end; calls `on_point` with each point.

        A non-finite loss stops the run after recording the point where it was seen.
        """
        t = self.cfg.train
        init_key, seed_key = jax.random.split(jax.random.key(seed))
        points: list[Point] = []
        with use_mesh(self.mesh):
            state = init_state(self.setup, init_key)
            train_it = moedata.make_train_iterator(self.cfg.data, self.tokenizer, t.seq_len,
                                                   t.batch_size, rows=self.layout.rows)
            wall = cpu = 0.0
            try:
                for step in range(t.steps):
                    batch = self.layout.to_global(next(train_it))
                    w0, c0 = time.perf_counter(), time.process_time()
                    state, metrics = self.step(state, batch, seed_key)
                    loss = float(metrics["loss"])  # waits for the step
                    dw, dc = time.perf_counter() - w0, time.process_time() - c0
                    if step == 0 and not self.compile_s:
                        # the first call compiles: timed on its own, out of the run's times
                        self.compile_s, self.compile_cpu_s = dw, dc
                    else:
                        wall, cpu = wall + dw, cpu + dc
                    done = step + 1
                    finite = math.isfinite(loss)
                    if done % eval_every == 0 or done == t.steps or not finite:
                        p = self.point(state, done, {"train_wall_s": wall, "train_cpu_s": cpu,
                                                     "train_loss": loss})
                        points.append(p)
                        on_point(p)
                    if not finite:
                        break
            finally:
                if hasattr(train_it, "close"):
                    train_it.close()
        return points


def flops_to_target(points: Sequence[Point], target: float, key: str = "train_flops"
                    ) -> float | None:
    """`key` (training FLOPs) at which the validation curve first reaches `target` bits
    per byte, interpolated linearly between the two evaluations around the crossing.

    The curve starts at (0, +inf): a first evaluation already at or below the target
    returns that evaluation's value. None if the curve never reaches the target.
    """
    prev = None
    for p in points:
        if p["bits_per_byte"] <= target:
            if prev is None or prev["bits_per_byte"] == p["bits_per_byte"]:
                return float(p[key])
            frac = (prev["bits_per_byte"] - target) / (prev["bits_per_byte"] - p["bits_per_byte"])
            return float(prev[key] + frac * (p[key] - prev[key]))
        prev = p
    return None


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, min and max of `values` (the seeds of one run)."""
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def efficiency_gain(baseline_flops: Sequence[float], candidate_flops: Sequence[float]
                    ) -> dict[str, float]:
    """FLOPs the baseline needs over the candidate's to reach the same target, minus 1
    (0.4 = "40 % more efficient"): of the seed means, and the min/max over seed pairs."""
    pairs = [b / c - 1.0 for b in baseline_flops for c in candidate_flops]
    mean = (sum(baseline_flops) / len(baseline_flops)) / (
        sum(candidate_flops) / len(candidate_flops)) - 1.0
    return {"mean": mean, "min": min(pairs), "max": max(pairs)}
