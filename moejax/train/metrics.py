"""Metric names and formulas (FLOPs per token, MFU, moe/*) and the writers.

Train metrics, one record per logged step (process 0 only):

  loss                  cross_entropy + the weighted MoE (and MTP) losses: the objective
  cross_entropy         mean next-token cross-entropy (nats) over real target tokens
  mtp_cross_entropy     with model.mtp.depth > 0: cross-entropy of the t+2 predictions
  target_tokens         tokens counted as targets in this step's batch
  perplexity            exp(cross_entropy)
  learning_rate         the schedule's value used by this step's update
  grad_norm             global L2 norm of the gradient before clipping
  step_time             seconds per step, averaged since the previous record (the first
                        record of a run includes compilation)
  tokens_per_second     global batch tokens (batch_size * seq_len, padding included) / step_time
  mfu                   model FLOP utilisation, see `flops_per_token` and `peak_flops_per_device`
  moe/balance_loss      unweighted sequence-wise balance loss, mean over MoE layers
  moe/z_loss            unweighted router z-loss, mean over MoE layers
  moe/dropped_fraction  share of (token, expert) assignments over capacity, mean over layers
  moe/load_max_over_mean/layer_<i>  busiest expert's load / mean load in decoder layer i
                        (i counts dense layers too, so the first MoE layer is num_dense_layers)
  moe/bias_norm         L2 norm of all aux-loss-free balance biases after this step
  skipped_steps         steps the non-finite guard (or the loss-spike check) skipped
                        since this process started (moejax/train/guard.py)

Records go to `<workdir>/metrics.jsonl` (one JSON object per line, with "step") and to
TensorBoard event files under `<workdir>/tensorboard/`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np

from moejax.config import AnyModelConfig
from moejax.model.build import architecture_of
from moejax.storage import JsonLines, as_path, tensorboard_writer

# Dense bf16 peak FLOP/s per chip, matched against `device.device_kind` (first hit wins,
# so more specific names come first). Sources: Google Cloud TPU and NVIDIA data sheets
# (SXM parts, dense, no sparsity).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("v5 lite", 197e12),  # TPU v5e
    ("v5e", 197e12),
    ("v6 lite", 918e12),  # TPU v6e (Trillium)
    ("v6e", 918e12),
    ("v5p", 459e12),
    ("v5", 459e12),  # TPU v5p reports "TPU v5"
    ("v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)
# CPU has no table entry: ~1e11 fp32 FLOP/s per device is what a 1024^3 jitted matmul
# measures on a 2-core AVX-512 machine; set train.peak_flops_per_device for yours.
CPU_PEAK_FLOPS = 1e11


def flops_per_token(m: AnyModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at `seq_len`: the model architecture's
    figure (`moejax.model.build.Architecture.flops_per_token`; for `Transformer`
    6 * N_active + the attention matmuls, see `moejax.model.counting`)."""
    return float(architecture_of(m).flops_per_token(m, seq_len))


def peak_flops_per_device(device: Any = None, override: float = 0.0) -> float:
    """Peak FLOP/s of one device: `override` if > 0, else the table, else CPU_PEAK_FLOPS.

    An accelerator missing from the table returns nan (MFU is then logged as nan rather
    than a made-up number).
    """
    if override > 0:
        return float(override)
    device = device if device is not None else jax.devices()[0]
    if device.platform == "cpu":
        return CPU_PEAK_FLOPS
    kind = device.device_kind
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops
    return math.nan


def host_metrics(raw: Mapping[str, Any], num_dense_layers: int) -> dict[str, float]:
    """Device metrics (already fetched) -> flat name: float, per-layer arrays spread out."""
    out: dict[str, float] = {}
    for name, value in raw.items():
        value = np.asarray(value)
        if name == "moe/load_max_over_mean":
            for i, v in enumerate(value.reshape(-1)):
                out[f"{name}/layer_{num_dense_layers + i}"] = float(v)
        elif value.ndim == 0:
            out[name] = float(value)
    if "cross_entropy" in out:
        out["perplexity"] = float(math.exp(min(out["cross_entropy"], 80.0)))
    return out


def throughput(step_time: float, tokens_per_step: int, flops_per_tok: float,
               peak_per_device: float, num_devices: int) -> dict[str, float]:
    """step_time, tokens_per_second and mfu for one record."""
    tps = tokens_per_step / step_time if step_time > 0 else math.nan
    mfu = flops_per_tok * tps / (peak_per_device * num_devices)
    return {"step_time": step_time, "tokens_per_second": tps, "mfu": mfu}


class MetricsWriter:
    """Appends records to metrics.jsonl and TensorBoard; a no-op unless `enabled`."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:  # local folders or URLs (moejax.storage)
            workdir = as_path(workdir)
            self._jsonl = JsonLines(workdir / "metrics.jsonl")
            self._tb = tensorboard_writer(workdir / "tensorboard")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """One record: a JSON line {"step": step, **metrics} and one scalar per name."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        for name, value in metrics.items():
            self._tb.add_scalar(name, float(value), int(step))
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            self.enabled = False
