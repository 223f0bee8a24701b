"""The train state and its sharded initialisation.

`TrainState` holds everything a step changes: the step count, the parameters, the optax
state, the router balance biases (the `moe_bias` collection, updated without gradients)
and the frozen variables (DeepSeek-V4's `hash_routing` token -> experts tables: drawn once
at init, saved with every checkpoint, never updated). It is created already sharded:

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
from moejax.model.build import FROZEN_COLLECTIONS, build_model
from moejax.model.moe.router import BIAS_COLLECTION
from moejax.sharding import param_shardings
from moejax.train.optimizer import make_optimizer


@flax.struct.dataclass
class TrainState:
    """One optimizer step's worth of state (a pytree; every leaf is a jax.Array)."""
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # unboxed parameter tree
    opt_state: Any  # optax state of `TrainSetup.tx`
    moe_bias: Any  # {"bias": [L_moe, E] fp32} or {} for a model without MoE layers
    frozen: Any = dataclasses.field(default_factory=dict)  # {collection: tree}, see FROZEN

    def variables(self) -> dict[str, Any]:
        """The `model.apply` variables dict."""
        return model_variables(self.params, self.moe_bias, self.frozen)


# Variable collections that are part of a model but never change after init (every
# architecture's `frozen_collections`; a model holds those of its own architecture).
FROZEN = FROZEN_COLLECTIONS


def model_variables(params: Any, moe_bias: Any, frozen: Any = None) -> dict[str, Any]:
    """{"params", "moe_bias", *frozen} for `model.apply` (empty collections left out)."""
    variables = {"params": params, **(frozen or {})}
    if moe_bias:
        variables[BIAS_COLLECTION] = moe_bias
    return variables


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """The model, its optimizer and the state's layout on `mesh` (nothing allocated)."""
    model: nn.Module  # moejax.Transformer or moejax.TransformerV4 (see build_model)
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Mesh
    shardings: TrainState  # NamedSharding per leaf
    abstract: TrainState  # jax.ShapeDtypeStruct per leaf, with its sharding (restore target)
    init_fn: Callable[[jax.Array], TrainState]  # unjitted: rng -> TrainState


INIT_TOKENS_SHAPE = (1, 8)  # the token batch `model.init` traces with (only its shape matters)


def _init_tokens() -> jax.Array:
    return jnp.zeros(INIT_TOKENS_SHAPE, jnp.int32)


def abstract_key() -> jax.ShapeDtypeStruct:
    """The shape and dtype of a `jax.random.key`, without creating a key on any device."""
    return jax.eval_shape(lambda: jax.random.key(0))


def _follow_params(abstract_opt: Any, abstract_params: Any, shardings: Any,
                   replicated: NamedSharding) -> Any:
    """Shardings of an optax state: param-shaped subtrees take the param shardings.

    A subtree is param-shaped if it is the parameter tree with the same leaf shapes, where
    some leaves may be `optax.MaskedNode` (the states of `optax.masked` / `multi_transform`,
    e.g. Muon's momentum, which holds only the matrices).
    """
    params_def = jax.tree.structure(abstract_params)
    param_leaves = jax.tree.leaves(abstract_params)
    sharding_leaves = params_def.flatten_up_to(shardings)

    def masked(x: Any) -> bool:
        return isinstance(x, optax.MaskedNode)

    def subtrees(node: Any) -> list[Any] | None:
        try:
            leaves = params_def.flatten_up_to(node)
        except (ValueError, TypeError):
            return None
        same = all(masked(n) or getattr(n, "shape", None) == p.shape
                   for n, p in zip(leaves, param_leaves))
        return leaves if same else None

    def follow(node: Any) -> Any:
        leaves = subtrees(node)
        if leaves is None:
            return replicated
        return params_def.unflatten([n if masked(n) else s
                                     for n, s in zip(leaves, sharding_leaves)])

    return jax.tree.map(follow, abstract_opt, is_leaf=lambda n: subtrees(n) is not None)


def make_setup(cfg: Config, mesh: Mesh) -> TrainSetup:
    """Builds model, optimizer, and the sharded abstract train state for `cfg` on `mesh`.

    Call inside `sharding.use_mesh(mesh)` (the model's activation constraints need it when
    `init_fn` is traced). Nothing is allocated: the init key and tokens are shapes only, so
    `mesh` may be made of devices that are not attached (a TPU topology compiled for ahead
    of time, see moejax.aot).
    """
    model = build_model(cfg.model)
    rng = abstract_key()
    tokens = jax.ShapeDtypeStruct(INIT_TOKENS_SHAPE, jnp.int32)
    boxed = jax.eval_shape(model.init, rng, tokens)
    var_shardings = param_shardings(boxed, mesh)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps, boxed["params"])

    def init_fn(key: jax.Array) -> TrainState:
        variables = nn.unbox(model.init(key, _init_tokens()))
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params),
                          moe_bias=variables.get(BIAS_COLLECTION, {}),
                          frozen={c: variables[c] for c in FROZEN if c in variables})

    shapes = jax.eval_shape(init_fn, rng)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(
        step=replicated, params=var_shardings["params"],
        opt_state=_follow_params(shapes.opt_state, shapes.params, var_shardings["params"],
                                 replicated),
        moe_bias=var_shardings.get(BIAS_COLLECTION, {}),
        frozen={c: var_shardings[c] for c in FROZEN if c in var_shardings})
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
