"""Rotary position embeddings: partial rotation, half or interleaved pairs, YaRN scaling.

YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language
Models"): frequencies whose wavelength is short compared with the original context keep
their value (extrapolation), long ones are divided by `factor` (interpolation), with a
linear ramp between the dims that rotate `beta_fast` and `beta_slow` times over the
original context. cos/sin are multiplied by the magnitude factor
get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim), get_mscale(f, m) =
0.1 * m * ln(f) + 1 (or 1 when f <= 1); when mscale or mscale_all_dim is 0 the factor is
get_mscale(factor, 1) (HuggingFace's rule).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import RopeConfig


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(rotations: float, dim: int, theta: float, max_len: int) -> float:
    """Dimension index whose wavelength fits `rotations` times into `max_len`."""
    return dim * math.log(max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def inverse_frequencies(rot_dim: int, cfg: RopeConfig) -> np.ndarray:
    """[rot_dim // 2] inverse frequencies in float64 (YaRN-blended when yarn_factor > 1)."""
    exponents = np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim
    extrapolated = 1.0 / cfg.theta ** exponents
    if cfg.yarn_factor <= 1.0:
        return extrapolated
    interpolated = extrapolated / cfg.yarn_factor
    low = math.floor(_correction_dim(cfg.yarn_beta_fast, rot_dim, cfg.theta,
                                     cfg.yarn_original_max_len))
    high = math.ceil(_correction_dim(cfg.yarn_beta_slow, rot_dim, cfg.theta,
                                     cfg.yarn_original_max_len))
    low, high = max(low, 0), min(high, rot_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(rot_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1.0 - ramp  # 1 = extrapolate (high frequency), 0 = interpolate
    return interpolated * (1 - keep) + extrapolated * keep


def magnitude_factor(cfg: RopeConfig) -> float:
    """The YaRN cos/sin scale (1.0 without YaRN)."""
    if cfg.yarn_factor <= 1.0:
        return 1.0
    if cfg.yarn_mscale and cfg.yarn_mscale_all_dim:  # as HF: both set, else get_mscale(f)
        return (yarn_get_mscale(cfg.yarn_factor, cfg.yarn_mscale)
                / yarn_get_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim))
    return yarn_get_mscale(cfg.yarn_factor, 1.0)


def apply_rope(x: jax.Array, positions: jax.Array, cfg: RopeConfig,
               heads_first: bool = False) -> jax.Array:
    """Rotates the first `fraction` of the last dim of x [B, L, H, K] at `positions` [B, L].

    style "half" pairs dim i with i + rot/2; "interleaved" pairs (2i, 2i+1) and keeps them
    in place. Computed in fp32, returned in x's dtype. heads_first: x is [B, H, L, K].
    """
    head_dim = x.shape[-1]
    rot_dim = int(head_dim * cfg.fraction)
    inv_freq = jnp.asarray(inverse_frequencies(rot_dim, cfg), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, rot/2]
    scale = magnitude_factor(cfg)
    heads = (slice(None), None) if heads_first else (slice(None), slice(None), None)
    cos, sin = (jnp.cos(angles) * scale)[heads], (jnp.sin(angles) * scale)[heads]
    rot, rest = x[..., :rot_dim].astype(jnp.float32), x[..., rot_dim:]
    if cfg.style == "half":
        a, b = rot[..., : rot_dim // 2], rot[..., rot_dim // 2:]
        rotated = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rotated = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1)
        rotated = rotated.reshape(rot.shape)
    return jnp.concatenate([rotated.astype(x.dtype), rest], axis=-1)
