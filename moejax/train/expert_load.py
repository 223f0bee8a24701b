"""The expert-load matrix `load` [L_moe, E]: its per-layer statistics and its picture.

`load[l, i]` is the share of layer l's routed (token, choice) pairs that expert i received
(`moejax.model.moe.router.expert_load`; each row sums to 1). Per MoE layer:

  load_cv         coefficient of variation std_i(load) / mean_i(load) (population std);
                  0 is perfectly balanced, sqrt(E / T - 1) is every token on the same T
                  experts
  dead_experts    experts whose share is below DEAD_FRACTION / E (a tenth of the uniform
                  share 1/E)
  load_min_share  smallest share (uniform: 1/E)
  load_max_share  largest share

The formulas use only array methods, so they run on jax arrays inside the jitted train
step (`moejax.train.loss.loss_metrics`) and on numpy arrays on the host (plots, tests).

`load_picture` renders the matrix as an RGB image without matplotlib (for TensorBoard,
written while training): one cell per (layer, expert), colour = share * E clipped to
[0, 2] on a viridis-like ramp (dark: starved, green-blue: uniform, yellow: twice the
uniform share or more), dead experts in red.
"""
from __future__ import annotations

from typing import Any

import numpy as np

DEAD_FRACTION = 0.1  # an expert is dead below this fraction of the uniform share 1/E
# viridis at 0, 1/4, 1/2, 3/4, 1 (matplotlib's colour map, five anchors interpolated)
RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98],
                 [253, 231, 37]], np.float64)
DEAD_RGB = (255, 0, 0)


def dead_threshold(num_experts: int) -> float:
    """The share below which an expert counts as dead: DEAD_FRACTION / E."""
    return DEAD_FRACTION / num_experts


def load_cv(load: Any) -> Any:
    """[..., E] -> [...]: std / mean of the shares (0 when a row is all zero)."""
    mean = load.mean(-1)
    return load.std(-1) / (mean + (mean == 0))


def dead_experts(load: Any) -> Any:
    """[..., E] -> [...] float: number of experts with share < DEAD_FRACTION / E."""
    return (load < dead_threshold(load.shape[-1])).sum(-1).astype(np.float32)


def load_summary(load: Any) -> dict[str, Any]:
    """[L_moe, E] -> the per-layer statistics [L_moe] named as in the module docstring."""
    return {"load_cv": load_cv(load), "dead_experts": dead_experts(load),
            "load_min_share": load.min(-1), "load_max_share": load.max(-1)}


def cell_pixels(rows: int, cols: int, width: int = 512, height: int = 256) -> tuple[int, int]:
    """(pixels per row, per column) so the picture is about width x height, 1..32 each."""
    return (int(np.clip(height // max(rows, 1), 1, 32)),
            int(np.clip(width // max(cols, 1), 1, 32)))


def load_picture(load: np.ndarray) -> np.ndarray:
    """[L_moe, E] shares -> uint8 RGB [H, W, 3], layers top to bottom (see module doc)."""
    load = np.asarray(load, np.float64)
    rows, cols = load.shape
    level = np.clip(load * cols / 2.0, 0.0, 1.0) * (len(RAMP) - 1)
    anchors = np.arange(len(RAMP))
    rgb = np.stack([np.interp(level, anchors, RAMP[:, c]) for c in range(3)], -1)
    rgb[load < dead_threshold(cols)] = DEAD_RGB
    dy, dx = cell_pixels(rows, cols)
    return np.repeat(np.repeat(rgb, dy, axis=0), dx, axis=1).round().astype(np.uint8)


__all__ = ["DEAD_FRACTION", "dead_experts", "dead_threshold", "load_cv", "load_picture",
           "load_summary"]
