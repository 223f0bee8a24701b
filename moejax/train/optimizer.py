"""optax optimizer: AdamW (or Muon + AdamW) with masked decoupled weight decay, warmup +
cosine, clipping.

    optimizer.name = "adamw":
    tx = clip_by_global_norm(optimizer.grad_clip_norm)        (identity when 0)
         -> adamw(schedule, b1, b2, eps, weight_decay, mask=decay_mask)
    optimizer.name = "muon" (DeepSeek-V4's split, moejax/train/muon.py):
    tx = clip_by_global_norm(...) -> Muon (momentum muon_momentum, muon_ns_steps
         Newton-Schulz steps, per expert / per stacked layer, weight_decay) on the matrices,
         AdamW (b1, b2, eps, no weight decay) on embeddings, head, norms, biases, sinks,
         compressor position biases and mHC scalars; both follow the same schedule.

The learning rate at optimizer step t (0-based: the update that produces step t + 1) is

    warmup  (t < W):   peak * t / W
    cosine  (t >= W):  peak * (f + (1 - f) * (1 + cos(pi * min(1, (t - W) / (S - W)))) / 2)
    constant (t >= W): peak

with W = optimizer.warmup_steps, S = train.steps, f = optimizer.end_lr_fraction; this is
`optax.warmup_cosine_decay_schedule(0, peak, W, S, f * peak)`. A warmup as long as the run
is shortened to S - 1 steps so the last step still has a defined learning rate.

Weight decay is decided from each parameter's *logical axis names* (the boxed abstract
variables), not from its rank, because scanned stacks add a `layers` axis to every
parameter (a norm scale inside a scanned stack is [layers, D]). A parameter decays iff it
is a matrix: at least two axes besides `layers`, none of them `norm`. Embeddings and the
LM head (any `vocab` axis) decay only with optimizer.decay_embeddings. Biases, attention
sinks and V4's compressor position biases (`NO_DECAY`) never decay, whatever their shape.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import optax

from moejax.config import OptimizerConfig
from moejax.train.muon import muon_adamw

# Parameters that never decay whatever their axes (V4's [m, 2d] compressor position bias is
# a matrix by shape but an additive bias by role).
NO_DECAY = ("bias", "base", "position_bias", "sinks")


def learning_rate_schedule(opt: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine to end_lr_fraction * peak (or constant)."""
    peak = opt.learning_rate
    warmup = min(opt.warmup_steps, max(total_steps - 1, 0))
    if opt.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1), end_value=opt.end_lr_fraction * peak)
    if warmup == 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])


def decays(names: tuple[str | None, ...] | None, ndim: int, decay_embeddings: bool) -> bool:
    """Whether a parameter with these logical names gets weight decay (see module doc)."""
    if names is None:  # unannotated leaf: fall back to its rank
        return ndim >= 2
    axes = [n for n in names if n != "layers"]
    if "norm" in axes or len(axes) < 2:
        return False
    if "vocab" in axes:
        return decay_embeddings
    return True


def decay_mask(abstract_params: Any, decay_embeddings: bool) -> Any:
    """Tree of bools (True = decayed) from boxed (nn.Partitioned) abstract parameters."""
    def one(path: Any, leaf: Any) -> bool:
        if str(getattr(path[-1], "key", path[-1])) in NO_DECAY:
            return False
        if isinstance(leaf, nn.Partitioned):
            return decays(tuple(leaf.names), leaf.value.ndim, decay_embeddings)
        return decays(None, len(leaf.shape), decay_embeddings)
    return jax.tree_util.tree_map_with_path(
        one, abstract_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def make_optimizer(opt: OptimizerConfig, total_steps: int, abstract_params: Any
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(transformation, schedule) for `opt`; `abstract_params` are the boxed abstract
    parameters (their logical names decide weight decay, their paths Muon's split).

    The chain has the same structure whatever the values (clipping off = identity), so a
    checkpoint's optimizer state restores under changed hyper-parameters.
    """
    schedule = learning_rate_schedule(opt, total_steps)
    clip = (optax.clip_by_global_norm(opt.grad_clip_norm) if opt.grad_clip_norm > 0
            else optax.identity())
    if opt.name == "muon":
        inner = muon_adamw(abstract_params, schedule, weight_decay=opt.weight_decay,
                           beta=opt.muon_momentum, ns_steps=opt.muon_ns_steps,
                           b1=opt.b1, b2=opt.b2, eps=opt.eps)
    elif opt.name == "adamw":
        inner = optax.adamw(learning_rate=schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                            weight_decay=opt.weight_decay,
                            mask=decay_mask(abstract_params, opt.decay_embeddings))
    else:
        raise ValueError(f"optimizer.name={opt.name!r} is not implemented; "
                         "use 'adamw' or 'muon'.")
    return optax.chain(clip, inner), schedule
