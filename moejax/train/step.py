"""The train step: a pure function, jitted once with explicit shardings.

The loss of a batch (next-token, MTP, MoE and indexer terms) is `moejax.train.loss`.

Gradient accumulation runs inside the step: the batch is cut into `train.micro_batches`
micro-batches (micro-batch m holds rows m, m + M, m + 2M, ..., so each device keeps its
rows) and `lax.scan` sums their gradients. Each micro-batch's cross-entropy is divided by
the whole batch's target count, so the summed gradient is the full batch's gradient
whatever the split; the MoE losses (already means) are averaged over micro-batches
(`loss.batch_loss` with the whole batch's `target_counts` and share 1/M).
One call is one optimizer step. After the optax update, the router balance biases move
by `update_balance_bias(bias, expert_load, rate)` (the rates of the model's
`Architecture.bias_update_rates`) with the step's
expert load (the mean over micro-batches), each bias variable with its own load
(`BIAS_LOADS`); they never see a gradient.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax.config import Config
from moejax.model.build import architecture_of
from moejax.model.moe.router import update_balance_bias
from moejax.sharding import logical_to_spec
from moejax.train.cross_entropy import head_weight
from moejax.train.loss import (Denominators, batch_loss, loss_metrics, mtp_depth, mtp_weight,
                               target_counts)
from moejax.train.state import TrainSetup, TrainState

Batch = dict[str, jax.Array]
# moe_bias variable -> the aux entry holding the expert load that updates it.
BIAS_LOADS = {"bias": "expert_load", "mtp_bias": "mtp_expert_load"}


def batch_sharding(mesh: Mesh, batch_size: int, seq_len: int) -> NamedSharding:
    """Sharding of a global [batch_size, seq_len] input array: ("act_batch", "act_length")."""
    spec = logical_to_spec(("act_batch", "act_length"), shape=(batch_size, seq_len), mesh=mesh)
    return NamedSharding(mesh, spec)


def global_batch(host_batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding
                 ) -> dict[str, jax.Array]:
    """This host's rows -> one global jax.Array per field, laid out by `sharding`."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in host_batch.items()}


def split_micro_batches(batch: Batch, num_micro: int) -> Batch:
    """[B, L] -> [M, B/M, L]; micro-batch m holds rows m, m + M, ... (device-local split)."""
    def one(x: jax.Array) -> jax.Array:
        b, length = x.shape
        return x.reshape(b // num_micro, num_micro, length).swapaxes(0, 1)
    return jax.tree.map(one, batch)


def micro_loss(setup: TrainSetup, cfg: Config, p: Any, fixed: Any, mb: Batch,
               rng: jax.Array, denoms: Denominators, num_micro: int
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One micro-batch's share of the batch loss, and its statistics (sums or means / M)."""
    kwargs = {"with_mtp": True} if mtp_depth(cfg) else {}
    chunk = cfg.train.loss_chunk
    if chunk:  # the loss applies the LM head tile by tile (cross_entropy.py)
        kwargs["return_hidden"] = True
    out, aux = setup.model.apply({"params": p, **fixed}, mb["tokens"],
                                 mb["segment_ids"], mb["positions"],
                                 rngs={"dropout": rng}, **kwargs)
    head = (head_weight(p, getattr(cfg.model, "tie_embeddings", False), out.dtype)
            if chunk else None)
    return batch_loss(out, aux, mb, mtp_weight(cfg), denoms, 1.0 / num_micro,
                      architecture_of(cfg.model).extra_losses, head=head, chunk=chunk)


def _micro_grads(setup: TrainSetup, cfg: Config, params: Any, fixed: Any, mb: Batch,
                 rng: jax.Array, denoms: Denominators, num_micro: int
                 ) -> tuple[Any, dict[str, jax.Array]]:
    """fp32 gradient and statistics of one micro-batch; `fixed` holds the variable
    collections that get no gradient (balance biases, frozen tables)."""
    grads, stats = jax.grad(
        lambda p: micro_loss(setup, cfg, p, fixed, mb, rng, denoms, num_micro),
        has_aux=True)(params)
    return jax.tree.map(lambda g: g.astype(jnp.float32), grads), stats


def gradients(setup: TrainSetup, cfg: Config, state: TrainState, batch: Batch,
              rng: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
    """Summed gradient of the batch loss over train.micro_batches micro-batches (lax.scan)."""
    num_micro = cfg.train.micro_batches
    denoms = target_counts(batch["segment_ids"], mtp_depth(cfg) > 0)
    fixed = {k: v for k, v in state.variables().items() if k != "params"}
    one = lambda mb, r: _micro_grads(setup, cfg, state.params, fixed,  # noqa: E731
                                     mb, r, denoms, num_micro)
    if num_micro == 1:
        return one(batch, rng)
    micro = split_micro_batches(batch, num_micro)
    grad_shardings = setup.shardings.params

    def body(carry: Any, xs: tuple[Batch, jax.Array]) -> tuple[Any, None]:
        mb, i = xs
        mb = {k: jax.lax.with_sharding_constraint(v, _row_sharding(setup.mesh, v.shape))
              for k, v in mb.items()}
        out = one(mb, jax.random.fold_in(rng, i))
        carry = jax.tree.map(jnp.add, carry, out)
        grads = jax.lax.with_sharding_constraint(carry[0], grad_shardings)
        return (grads, carry[1]), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(one, first, rng))
    (grads, stats), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(num_micro)))
    return grads, stats


def _row_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("act_batch", "act_length"), shape=shape,
                                               mesh=mesh))


def update_fn(setup: TrainSetup, cfg: Config
              ) -> Callable[[TrainState, Batch, jax.Array],
                            tuple[TrainState, dict, dict[str, jax.Array]]]:
    """One optimizer step: (state, batch, seed_key) -> (next state, metrics, terms).

    `terms` are the scalars whose finiteness `moejax.train.guard` checks: `loss`,
    `cross_entropy`, `moe_loss`, `mtp_cross_entropy` (with MTP), the architecture's extra
    losses and `grad_norm` (names: `guard.guard_terms`).
    """
    arch = architecture_of(cfg.model)
    rates = arch.bias_update_rates(cfg.model)
    weight_mtp = mtp_weight(cfg)

    def update(state: TrainState, batch: Batch, seed_key: jax.Array
               ) -> tuple[TrainState, dict[str, jax.Array], dict[str, jax.Array]]:
        rng = jax.random.fold_in(seed_key, state.step)
        grads, stats = gradients(setup, cfg, state, batch, rng)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        moe_bias = {name: update_balance_bias(bias, stats[BIAS_LOADS[name]], rates[name])
                    for name, bias in state.moe_bias.items()}
        lr = jnp.asarray(setup.schedule(state.step), jnp.float32)
        metrics = {**loss_metrics(stats, weight_mtp, arch.extra_losses),
                   "grad_norm": optax.tree.norm(grads), "learning_rate": lr}
        if "expert_load" in stats:
            metrics["moe/bias_norm"] = optax.tree.norm(moe_bias)
        terms = {name: metrics[name] for name in
                 ("loss", "cross_entropy", "mtp_cross_entropy", *arch.extra_losses)
                 if name in metrics}
        terms.update(moe_loss=stats["moe_loss"], grad_norm=metrics["grad_norm"])
        next_state = TrainState(state.step + 1, params, opt_state, moe_bias, state.frozen)
        return next_state, metrics, terms
    return update


def train_step_fn(setup: TrainSetup, cfg: Config
                  ) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
    """The pure step: (state, batch, seed_key) -> (next state, metrics of this step).

    No non-finite guard: the host loop runs `guard.guarded_step_fn` around `update_fn`.
    """
    update = update_fn(setup, cfg)

    def step(state: TrainState, batch: Batch, seed_key: jax.Array
             ) -> tuple[TrainState, dict[str, jax.Array]]:
        next_state, metrics, _ = update(state, batch, seed_key)
        return next_state, metrics
    return step


def make_train_step(setup: TrainSetup, cfg: Config
                    ) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
    """`train_step_fn` jitted once: explicit in/out shardings, the state donated."""
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    rows = batch_sharding(setup.mesh, cfg.train.batch_size, cfg.train.seq_len)
    return jax.jit(train_step_fn(setup, cfg),
                   in_shardings=(setup.shardings, rows, replicated),
                   out_shardings=(setup.shardings, replicated), donate_argnums=(0,))
