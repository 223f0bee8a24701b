"""DeepSeekMoE feed-forward block: router + routed experts + shared experts.

y = shared(x) + sum_{j in top-k} w_j expert_j(x); the routed sum goes through the dispatch
strategy named by `MoEConfig.dispatch` (see capacity.py), or, when expert_parallel
resolves to "shard_map" under an active mesh (execution.py), through the explicit
expert-parallel transport of parallel/shard_map.py.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import MoEConfig
from moejax.model.moe.execution import execution_of
from moejax.model.moe.parallel.shard_map import select_dispatch
from moejax.model.layers import MLP, normal_init
from moejax.model.moe.router import Router, routing_stats
from moejax.sharding import active_mesh, constrain

DType = Any


def group_size_for(num_tokens: int, preferred: int) -> int:
    """Largest divisor of num_tokens that is <= preferred (capacity is per group)."""
    size = min(preferred, num_tokens)
    while num_tokens % size:
        size -= 1
    return size


def routed_experts(module: nn.Module, x: jax.Array, routing: Any, mask: jax.Array, cfg: Any,
                   swiglu_limit: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """The routed part of a DeepSeekMoE layer, called from `module`'s compact `__call__`.

    Creates `module`'s stacked expert weights gate/up [E, D, F] and down [E, F, D] (init
    std `module.init_std`, dtype `module.param_dtype`), cuts x [B, L, D] into groups of
    `cfg.group_size` tokens and runs the dispatch `cfg` selects on the active mesh
    (execution.py resolves dispatch, expert_parallel, expert_transport, dropless_backend;
    MoEConfig and V4MoEConfig both have them, and capacity_factor).
    Returns (y [B, L, D], dropped (token, choice) pairs).
    """
    b, length, d = x.shape
    e, f = cfg.num_experts, cfg.expert_hidden
    init = lambda *names: normal_init(module.init_std, names)  # noqa: E731
    weights = (
        module.param("gate", init("expert", "embed", "expert_mlp"), (e, d, f), module.param_dtype),
        module.param("up", init("expert", "embed", "expert_mlp"), (e, d, f), module.param_dtype),
        module.param("down", init("expert", "expert_mlp", "embed"), (e, f, d), module.param_dtype),
    )
    s = group_size_for(b * length, cfg.group_size)
    g = b * length // s
    grouped = constrain(x.reshape(g, s, d), ("act_batch", None, "act_embed"))
    mesh = active_mesh()
    dispatch = select_dispatch(execution_of(cfg, mesh), mesh)
    routed, dropped = dispatch(
        grouped, routing.indices.reshape(g, s, -1), routing.weights.reshape(g, s, -1),
        mask.reshape(g, s), weights, cfg.capacity_factor, swiglu_limit)
    return routed.reshape(b, length, d), dropped


class MoE(nn.Module):
    """Fine-grained routed SwiGLU experts plus shared experts (DeepSeekMoE)."""
    cfg: MoEConfig
    init_std: float = 0.02
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x [B, L, D], bias [E] (selection only), mask [B, L] real tokens -> (y, stats)."""
        cfg = self.cfg
        with jax.named_scope("router"):
            routing = Router(cfg.num_experts, cfg.top_k, cfg.score_fn, cfg.renormalize,
                             cfg.routed_scaling_factor, cfg.num_groups, cfg.top_groups,
                             self.init_std, name="router")(x, bias)
        y, dropped = routed_experts(self, x, routing, mask, cfg)
        if cfg.num_shared_experts:
            y = y + MLP(cfg.num_shared_experts * cfg.expert_hidden, self.init_std, self.dtype,
                        self.param_dtype, name="shared")(x)
        stats = routing_stats(routing, mask)
        real_pairs = jnp.maximum(mask.sum() * cfg.top_k, 1)
        stats["dropped_fraction"] = dropped / real_pairs
        return constrain(y, ("act_batch", "act_length", "act_embed")), stats
