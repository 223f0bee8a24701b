"""Muon for matrices, AdamW for the rest (DeepSeek-V4's optimizer split), as one optax chain.

    tx = muon_adamw(params, learning_rate_schedule, weight_decay=0.1)

`optax.multi_transform` routes every parameter by a label computed from its path:

* "adamw": the input embedding (`embedding`), the LM head (`head/kernel`), RMSNorm scales
  (`scale`), biases (`bias`, `base`, `position_bias`), attention sinks (`sinks`), the mHC
  static biases and gating factors (`base`, `scale`), and anything with fewer than two
  axes. DeepSeek-V4 trains exactly these with AdamW.
* "muon": every other matrix: momentum (Nesterov), orthogonalised by Newton-Schulz
  (`optax.contrib.scale_by_muon`), rescaled to a consistent RMS
  (0.2 * sqrt(max(fan_in, fan_out)) by default so the step size matches AdamW's), decoupled
  weight decay, learning rate.

Orthogonalisation works on the matrix a weight *is*, not on its storage: leading stacked
axes (`layers` of a scan, the expert axis E of [E, D, F], the groups of V4's o_a
[g, in, r]) are batch axes, so each expert's [D, F] is orthogonalised on its own.
Head-split kernels are one matrix: q/k/v-like [in, H, K] reduce over `in` and output H*K
(`query`, `key`, `value`, `q_b`, `q_up`, `k_up`, `v_up`); output projections [H, K, out]
reduce over H*K (`out`, `o_b`). Any other kernel is [..., in, out].
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon

MaskedNode = optax.MaskedNode
ADAMW_LEAVES = ("embedding", "scale", "bias", "base", "position_bias", "sinks")
HEADS_OUT = ("query", "key", "value", "q_b", "q_up", "k_up", "v_up")  # [in, H, K]
HEADS_IN = ("out", "o_b")  # [H, K, out] / [g, r, out]


def _names(path: Any) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def label(path: tuple[str, ...], ndim: int) -> str:
    """"muon" or "adamw" for a parameter at `path` (names) with `ndim` axes."""
    leaf = path[-1]
    if leaf in ADAMW_LEAVES or ndim < 2 or (len(path) >= 2 and path[-2] == "head"):
        return "adamw"
    return "muon"


def dimension_numbers(path: tuple[str, ...], ndim: int) -> MuonDimensionNumbers:
    """Which axes form the matrix of a Muon parameter (the others are batch axes)."""
    leaf = path[-1]
    if leaf in HEADS_OUT and ndim >= 3:
        return MuonDimensionNumbers(reduction_axis=(-3,), output_axis=(-2, -1))
    if leaf in HEADS_IN and ndim >= 3:
        return MuonDimensionNumbers(reduction_axis=(-3, -2), output_axis=(-1,))
    return MuonDimensionNumbers(reduction_axis=(-2,), output_axis=(-1,))


def param_labels(params: Any) -> Any:
    """Tree of "muon" / "adamw" labels (params may be boxed, abstract or concrete)."""
    params = nn.unbox(params)
    return jax.tree_util.tree_map_with_path(lambda p, x: label(_names(p), len(x.shape)),
                                            params)


def _muon_dims(updates: Any) -> Any:
    """Dimension numbers of the (masked) Muon sub-tree, MaskedNode where masked."""
    def one(path: Any, x: Any) -> Any:
        if isinstance(x, MaskedNode):
            return MaskedNode()
        return dimension_numbers(_names(path), x.ndim)
    return jax.tree_util.tree_map_with_path(one, updates,
                                            is_leaf=lambda x: isinstance(x, MaskedNode))


def _fans(shape: tuple[int, ...], dims: MuonDimensionNumbers) -> tuple[int, int]:
    ndim = len(shape)
    fan_in = math.prod(shape[a % ndim] for a in dims.reduction_axis)
    return fan_in, math.prod(shape[a % ndim] for a in dims.output_axis)


def scale_by_matrix_shape(consistent_rms: float | None) -> optax.GradientTransformation:
    """Orthogonalised updates x 0.2 * sqrt(max(fan_in, fan_out)) (consistent RMS, Moonshot's
    "Muon is scalable"), or x sqrt(max(1, fan_out / fan_in)) when `consistent_rms` is None."""
    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params

        def one(path: Any, u: Any) -> Any:
            if isinstance(u, MaskedNode):
                return u
            fan_in, fan_out = _fans(u.shape, dimension_numbers(_names(path), u.ndim))
            if consistent_rms is None:
                return u * math.sqrt(max(1.0, fan_out / fan_in))
            return u * (math.sqrt(max(fan_in, fan_out)) * consistent_rms)
        return jax.tree_util.tree_map_with_path(
            one, updates, is_leaf=lambda x: isinstance(x, MaskedNode)), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def muon_adamw(params: Any, learning_rate_schedule: optax.ScalarOrSchedule, *,
               adam_learning_rate: optax.ScalarOrSchedule | None = None,
               weight_decay: float = 0.1, adam_weight_decay: float = 0.0,
               beta: float = 0.95, ns_steps: int = 5, consistent_rms: float | None = 0.2,
               b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
               nesterov: bool = True) -> optax.GradientTransformation:
    """Muon (matrices, per expert / per stacked layer) + AdamW (the rest), see module doc.

    `params` only fixes the labels (shapes and paths); `adam_learning_rate` defaults to the
    Muon schedule, which `consistent_rms` makes comparable. `weight_decay` is Muon's
    decoupled decay (multiplied by the learning rate); `adam_weight_decay` AdamW's.
    """
    muon = optax.chain(
        scale_by_muon(ns_steps=ns_steps, beta=beta, eps=eps, nesterov=nesterov,
                      weight_dimension_numbers=_muon_dims),
        scale_by_matrix_shape(consistent_rms),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate_schedule),
    )
    adamw = optax.adamw(
        learning_rate=(learning_rate_schedule if adam_learning_rate is None
                       else adam_learning_rate),
        b1=b1, b2=b2, eps=eps, weight_decay=adam_weight_decay)
    return optax.multi_transform({"muon": muon, "adamw": adamw}, param_labels(params))
