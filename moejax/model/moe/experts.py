"""The routed experts' weights and their SwiGLU on capacity buffers.

Every dispatch strategy computes the same expert function (DeepSeekMoE, with DeepSeek-V4's
optional clamp, `layers.clamped_swiglu`):

    expert_e(x) = down_e( silu(x @ gate_e) * (x @ up_e) )

with the weights stacked over experts: gate, up [E, D, F], down [E, F, D] (`ExpertWeights`).
`expert_swiglu` applies it to buffers of C token slots per expert, [..., E, C, D], as
batched matmuls over E (XLA: one dot_general per projection, E its batch dimension). The
dropless strategies run the same function over rows sorted by expert instead
(dropless.py's grouped matmuls, cpu/grouped_ffn.py, cpu/overflow_ffn.py).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from moejax.model.layers import clamped_swiglu
from moejax.sharding import constrain

ExpertWeights = tuple[jax.Array, jax.Array, jax.Array]  # gate, up [E, D, F]; down [E, F, D]


def expert_swiglu(buffers: jax.Array, weights: ExpertWeights, swiglu_limit: float = 0.0,
                  hidden_axes: Sequence[str | None] | None = None) -> jax.Array:
    """Every expert's SwiGLU on its buffer: [..., E, C, D] -> [..., E, C, D].

    The weights are cast to the buffers' dtype. `hidden_axes` (logical names of the
    [..., E, C, F] hidden activations) constrains their sharding under GSPMD; leave it
    None inside a shard_map.
    """
    gate, up, down = (w.astype(buffers.dtype) for w in weights)
    h = clamped_swiglu(jnp.einsum("...ECD,EDF->...ECF", buffers, gate),
                       jnp.einsum("...ECD,EDF->...ECF", buffers, up), swiglu_limit)
    if hidden_axes is not None:
        h = constrain(h, hidden_axes)
    return jnp.einsum("...ECF,EFD->...ECD", h, down)
