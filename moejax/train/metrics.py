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
  moe/bias_norm         L2 norm of all aux-loss-free balance biases after this step
  skipped_steps         steps the non-finite guard (or the loss-spike check) skipped
                        since this process started (moejax/train/guard.py)

Per MoE layer, one list per name in metrics.jsonl (entry j is decoder layer
num_dense_layers + j) and one TensorBoard scalar `<name>/layer_<i>` per decoder layer i
(`moejax/train/expert_load.py` has the formulas; shares are of the step's routed
(token, choice) pairs):
  moe/load_max_over_mean  busiest expert's share / mean share
  moe/load_cv           coefficient of variation of the shares (0 = balanced)
  moe/dead_experts      experts with share < 1/(10 E)
  moe/load_min_share    smallest share (uniform = 1/E)
  moe/load_max_share    largest share
  moe/router_entropy    mean over tokens of the entropy (nats) of the normalised router
                        scores s / sum(s) over all E experts (the softmax for softmax
                        scoring, normalised sigmoid scores for V3); log(E) = no
                        preference. NaN on DeepSeek-V4 hash layers, whose experts are
                        fixed by token id
TensorBoard also gets, at the first logged step, at steps that are multiples of
LOAD_IMAGE_LOGS * train.log_every, and at the last logged step, the image
`moe/expert_load` (layers x experts, see `expert_load.load_picture`) and one histogram of
the E shares per MoE layer, `moe/expert_load/layer_<i>`; the matrix itself is not
written to metrics.jsonl (61 layers x 256 experts per record would dwarf the rest).

Records go to `<workdir>/metrics.jsonl` (one JSON object per line, with "step") and to
TensorBoard event files under `<workdir>/tensorboard/`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from moejax.config import AnyModelConfig
from moejax.model.build import architecture_of
from moejax.storage import JsonLines, as_path, tensorboard_writer
from moejax.train.expert_load import load_picture
from moejax.train.wandb_tracker import WandbTracker

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
LOAD_IMAGE_LOGS = 10  # expert-load image and histograms: every 10th log interval
Value = float | list[float]  # a scalar, or one value per MoE layer


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


def host_metrics(raw: Mapping[str, Any]) -> dict[str, Value]:
    """Device metrics (already fetched) -> name: float, or a list of floats per MoE layer
    for the per-layer metrics; the matrix `moe/expert_load` is left out (it goes to
    `MetricsWriter.write_expert_load`)."""
    out: dict[str, Value] = {}
    for name, value in raw.items():
        value = np.asarray(value)
        if value.ndim == 1:
            out[name] = [float(v) for v in value]
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
    """Appends records to metrics.jsonl and TensorBoard (and `tracker`, e.g. the wandb one,
    when given, with TensorBoard's scalars); a no-op unless `enabled`.

    `first_moe_layer` (the config's num_dense_layers) numbers the per-layer TensorBoard
    tags by decoder layer; `load_every` (steps, 0 = every call) spaces the expert-load
    images and histograms, the last matrix given is always written by `close`.
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True,
                 first_moe_layer: int = 0, load_every: int = 0,
                 tracker: WandbTracker | None = None):
        self.enabled = enabled
        self.first_moe_layer, self.load_every = first_moe_layer, load_every
        self._tracker = tracker
        self._jsonl = None
        self._tb = None
        # (step, matrix) of the newest load; matrix None once written
        self._load: tuple[int, np.ndarray | None] | None = None
        if enabled:  # local folders or URLs (moejax.storage)
            workdir = as_path(workdir)
            self._jsonl = JsonLines(workdir / "metrics.jsonl")
            self._tb = tensorboard_writer(workdir / "tensorboard")

    def write(self, step: int, metrics: Mapping[str, Value]) -> None:
        """One record: a JSON line {"step": step, **metrics} and one scalar per name (per
        layer for list values: `<name>/layer_<first_moe_layer + j>`)."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        scalars = {}
        for name, value in record.items():
            if isinstance(value, list):
                for j, v in enumerate(value):
                    scalars[f"{name}/layer_{self.first_moe_layer + j}"] = v
            elif name != "step":
                scalars[name] = value
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, int(step))
        self._tb.flush()
        if self._tracker is not None:
            self._tracker.log(step, scalars)

    def write_expert_load(self, step: int, load: Any) -> None:
        """Keeps the [L_moe, E] load of `step`; writes it to TensorBoard (image and
        per-layer histograms) when `step` is a multiple of `load_every`, or the first time."""
        if not self.enabled or load is None:
            return
        first = self._load is None
        self._load = (int(step), np.asarray(load, np.float32))
        if first or self.load_every <= 0 or step % self.load_every == 0:
            self._write_load()

    def _write_load(self) -> None:
        step, load = self._load
        # tensorboardX encodes the PNG with pillow (in install_requires for this)
        self._tb.add_image("moe/expert_load", load_picture(load), step, dataformats="HWC")
        for j, row in enumerate(load):
            self._tb.add_histogram(f"moe/expert_load/layer_{self.first_moe_layer + j}",
                                   row, step)
        self._tb.flush()
        self._load = (step, None)

    def close(self) -> None:
        if self.enabled:
            if self._load is not None and self._load[1] is not None:
                self._write_load()
            self._jsonl.close()
            self._tb.close()
            if self._tracker is not None:
                self._tracker.close()
            self.enabled = False


def _plain(value: Value | np.ndarray) -> Value:
    """A float, or a list of floats (JSON and TensorBoard take both)."""
    if isinstance(value, (Sequence, np.ndarray)) and np.ndim(value) == 1:
        return [float(v) for v in value]
    return float(value)
