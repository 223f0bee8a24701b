"""The train state and its sharded initialisation.

`TrainState` holds everything a step changes: the step count, the parameters, the optax
state and the router balance biases (the `moe_bias` collection, updated without
gradients). It is created already sharded:

  1. `jax.eval_shape(model.init)` gives boxed abstract variables with logical axis names;
  2. `sharding.param_shardings` maps the names to NamedShardings on the mesh;
  3. the optimizer state's shardings follow the parameters: every subtree of the abstract
     optax state shaped like the parameter tree (Adam's mu and nu) takes the parameter
     shardings, everything else (step counts) is replicated;
  4. one jitted init with those `out_shardings` writes each shard in place.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax.config import Config
from moejax.model.transformer import BIAS_COLLECTION, Transformer
from moejax.sharding import param_shardings
from moejax.train.optimizer import decay_mask, make_optimizer


@flax.struct.dataclass
class TrainState:
    """One optimizer step's worth of state (a pytree; every leaf is a jax.Array)."""
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # unboxed parameter tree
    opt_state: Any  # optax state of `TrainSetup.tx`
    moe_bias: Any  # {"bias": [L_moe, E] fp32} or {} for a model without MoE layers

    def variables(self) -> dict[str, Any]:
        """The `model.apply` variables dict."""
        return model_variables(self.params, self.moe_bias)


def model_variables(params: Any, moe_bias: Any) -> dict[str, Any]:
    """{"params": ..., "moe_bias": ...} for `model.apply` (no bias collection if empty)."""
    if moe_bias:
        return {"params": params, BIAS_COLLECTION: moe_bias}
    return {"params": params}


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """The model, its optimizer and the state's layout on `mesh` (nothing allocated)."""
    model: Transformer
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Mesh
    shardings: TrainState  # NamedSharding per leaf
    abstract: TrainState  # jax.ShapeDtypeStruct per leaf, with its sharding (restore target)
    init_fn: Callable[[jax.Array], TrainState]  # unjitted: rng -> TrainState


def _init_tokens() -> jax.Array:
    return jnp.zeros((1, 8), jnp.int32)


def _follow_params(abstract_opt: Any, abstract_params: Any, shardings: Any,
                   replicated: NamedSharding) -> Any:
    """Shardings of an optax state: param-shaped subtrees take the param shardings."""
    params_def = jax.tree.structure(abstract_params)
    shapes = [x.shape for x in jax.tree.leaves(abstract_params)]

    def like_params(node: Any) -> bool:
        if jax.tree.structure(node) != params_def:
            return False
        return [x.shape for x in jax.tree.leaves(node)] == shapes

    return jax.tree.map(lambda node: shardings if like_params(node) else replicated,
                        abstract_opt, is_leaf=like_params)


def make_setup(cfg: Config, mesh: Mesh) -> TrainSetup:
    """Builds model, optimizer, and the sharded abstract train state for `cfg` on `mesh`.

    Call inside `sharding.use_mesh(mesh)` (the model's activation constraints need it when
    `init_fn` is traced).
    """
    model = Transformer(cfg.model)
    rng = jax.random.key(0)
    boxed = jax.eval_shape(model.init, rng, _init_tokens())
    var_shardings = param_shardings(boxed, mesh)
    mask = decay_mask(boxed["params"], cfg.optimizer.decay_embeddings)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps, mask)

    def init_fn(key: jax.Array) -> TrainState:
        variables = nn.unbox(model.init(key, _init_tokens()))
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params),
                          moe_bias=variables.get(BIAS_COLLECTION, {}))

    shapes = jax.eval_shape(init_fn, rng)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(
        step=replicated, params=var_shardings["params"],
        opt_state=_follow_params(shapes.opt_state, shapes.params, var_shardings["params"],
                                 replicated),
        moe_bias=var_shardings.get(BIAS_COLLECTION, {}))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            shapes, shardings)
    return TrainSetup(model, tx, schedule, mesh, shardings, abstract, init_fn)


def init_state(setup: TrainSetup, rng: jax.Array) -> TrainState:
    """A fresh state, every leaf created directly with its sharding (nothing gathered)."""
    return jax.jit(setup.init_fn, out_shardings=setup.shardings)(rng)


def param_count(state_or_params: Any) -> int:
    """Number of parameters in a TrainState's params (or any array tree)."""
    tree = state_or_params.params if isinstance(state_or_params, TrainState) else state_or_params
    return int(sum(x.size for x in jax.tree.leaves(tree)))
