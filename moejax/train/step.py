"""Loss and the train / eval steps: pure functions, each jitted once with explicit shardings.

Loss of a batch of packed rows (tokens, segment_ids, positions: int32 [B, L]):

    target t+1 of position t counts iff segment_ids[t+1] == segment_ids[t] != 0
    loss = sum of counted -log p(target) / number counted  +  aux["moe_loss"]
           [+ mtp.loss_weight * MTP cross-entropy (targets t+2) + aux["mtp_moe_loss"]]
           [+ aux["indexer_loss"]: DeepSeek-V4's lightning-indexer KL, trains the indexer only]

so no prediction crosses a document boundary and padding (segment 0) is never a target.
The bracketed multi-token-prediction terms exist only with model.mtp.depth > 0.

Gradient accumulation runs inside the step: the batch is cut into `train.micro_batches`
micro-batches (micro-batch m holds rows m, m + M, m + 2M, ..., so each device keeps its
rows) and `lax.scan` sums their gradients. Each micro-batch's cross-entropy is divided by
the whole batch's target count, so the summed gradient is the full batch's gradient
whatever the split; the MoE losses (already means) are averaged over micro-batches.
One call is one optimizer step. After the optax update, the router balance biases move
by `update_balance_bias(bias, expert_load, model.moe.bias_update_rate)` with the step's
expert load (the mean over micro-batches), each bias variable with its own load
(`BIAS_LOADS`); they never see a gradient.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax.config import Config
from moejax.model.moe.router import update_balance_bias
from moejax.sharding import logical_to_spec
from moejax.train.cross_entropy import head_weight, shifted_token_nll
from moejax.train.state import TrainSetup, TrainState

Batch = dict[str, jax.Array]
MOE_STATS = ("balance_loss", "z_loss", "dropped_fraction", "expert_load", "mtp_expert_load")
# moe_bias variable -> the aux entry holding the expert load that updates it.
BIAS_LOADS = {"bias": "expert_load", "mtp_bias": "mtp_expert_load"}


def mtp_depth(cfg: Config) -> int:
    """Multi-token-prediction depth of the model (0 when the config has no MTP section)."""
    return int(getattr(getattr(cfg.model, "mtp", None), "depth", 0))


def target_mask(segment_ids: jax.Array) -> jax.Array:
    """bool [B, L-1]: whether the token at t+1 is a loss target for position t."""
    current, following = segment_ids[:, :-1], segment_ids[:, 1:]
    return (following == current) & (current != 0)


def token_nll(logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token negative log-likelihoods over counted targets, their count)."""
    mask = target_mask(segment_ids)
    nll = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), tokens[:, 1:])
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask).astype(jnp.float32)


def batch_sharding(mesh: Mesh, batch_size: int, seq_len: int) -> NamedSharding:
    """Sharding of a global [batch_size, seq_len] input array: ("act_batch", "act_length")."""
    spec = logical_to_spec(("act_batch", "act_length"), shape=(batch_size, seq_len), mesh=mesh)
    return NamedSharding(mesh, spec)


def split_micro_batches(batch: Batch, num_micro: int) -> Batch:
    """[B, L] -> [M, B/M, L]; micro-batch m holds rows m, m + M, ... (device-local split)."""
    def one(x: jax.Array) -> jax.Array:
        b, length = x.shape
        return x.reshape(b // num_micro, num_micro, length).swapaxes(0, 1)
    return jax.tree.map(one, batch)


def _micro_loss(setup: TrainSetup, cfg: Config, p: Any, fixed: Any, mb: Batch,
                rng: jax.Array, denoms: tuple[jax.Array, jax.Array], num_micro: int
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One micro-batch's share of the batch loss, and its statistics (sums or means / M)."""
    kwargs = {"with_mtp": True} if mtp_depth(cfg) else {}
    chunk = cfg.train.loss_chunk
    if chunk:  # the loss applies the head tile by tile (cross_entropy.py)
        kwargs["return_hidden"] = True
    out, aux = setup.model.apply({"params": p, **fixed}, mb["tokens"],
                                 mb["segment_ids"], mb["positions"],
                                 rngs={"dropout": rng}, **kwargs)
    if chunk:
        w = head_weight(p, getattr(cfg.model, "tie_embeddings", False), out.dtype)
        nll, count = shifted_token_nll(out, w, mb["tokens"], target_mask(mb["segment_ids"]),
                                       1, chunk)
    else:
        nll, count = token_nll(out, mb["tokens"], mb["segment_ids"])
    moe_loss = aux.get("moe_loss", jnp.zeros((), jnp.float32)) / num_micro
    indexer_loss = aux.get("indexer_loss", jnp.zeros((), jnp.float32)) / num_micro
    stats = {"nll": nll, "count": count}
    stats.update({k: aux[k] / num_micro for k in MOE_STATS if k in aux})
    loss = nll / denoms[0]
    if mtp_depth(cfg):
        from moejax.model.mtp import mtp_target_mask, mtp_token_nll
        if chunk:
            mtp_nll, mtp_count = shifted_token_nll(
                aux["mtp_hidden"], w, mb["tokens"], mtp_target_mask(mb["segment_ids"]), 2,
                chunk)
        else:
            mtp_nll, mtp_count = mtp_token_nll(aux["mtp_logits"], mb["tokens"],
                                               mb["segment_ids"])
        stats.update(mtp_nll=mtp_nll, mtp_count=mtp_count)
        loss = loss + cfg.model.mtp.loss_weight * mtp_nll / denoms[1]
        moe_loss = moe_loss + aux["mtp_moe_loss"] / num_micro
    stats["moe_loss"] = moe_loss
    if "indexer_loss" in aux:
        stats["indexer_loss"] = indexer_loss
    return loss + moe_loss + indexer_loss, stats


def _micro_grads(setup: TrainSetup, cfg: Config, params: Any, fixed: Any, mb: Batch,
                 rng: jax.Array, denoms: tuple[jax.Array, jax.Array], num_micro: int
                 ) -> tuple[Any, dict[str, jax.Array]]:
    """fp32 gradient and statistics of one micro-batch; `fixed` holds the variable
    collections that get no gradient (balance biases, frozen tables)."""
    grads, stats = jax.grad(
        lambda p: _micro_loss(setup, cfg, p, fixed, mb, rng, denoms, num_micro),
        has_aux=True)(params)
    return jax.tree.map(lambda g: g.astype(jnp.float32), grads), stats


def _denominators(segment_ids: jax.Array, with_mtp: bool) -> tuple[jax.Array, jax.Array]:
    """Whole-batch target counts, at least 1: (next token, token t+2 if with_mtp else 1)."""
    count = lambda m: jnp.maximum(jnp.sum(m), 1).astype(jnp.float32)  # noqa: E731
    if not with_mtp:
        return count(target_mask(segment_ids)), jnp.ones((), jnp.float32)
    from moejax.model.mtp import mtp_target_mask
    return count(target_mask(segment_ids)), count(mtp_target_mask(segment_ids))


def gradients(setup: TrainSetup, cfg: Config, state: TrainState, batch: Batch,
              rng: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
    """Summed gradient of the batch loss over train.micro_batches micro-batches (lax.scan)."""
    num_micro = cfg.train.micro_batches
    denoms = _denominators(batch["segment_ids"], mtp_depth(cfg) > 0)
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


def _step_metrics(stats: dict[str, jax.Array], grad_norm: jax.Array, lr: jax.Array,
                  new_bias: Any, mtp_weight: float) -> dict[str, jax.Array]:
    ce = stats["nll"] / jnp.maximum(stats["count"], 1.0)
    metrics = {"loss": ce + stats["moe_loss"], "cross_entropy": ce, "grad_norm": grad_norm,
               "learning_rate": lr, "target_tokens": stats["count"]}
    if "mtp_nll" in stats:
        metrics["mtp_cross_entropy"] = stats["mtp_nll"] / jnp.maximum(stats["mtp_count"], 1.0)
        metrics["loss"] = metrics["loss"] + mtp_weight * metrics["mtp_cross_entropy"]
    if "indexer_loss" in stats:
        metrics["indexer_loss"] = stats["indexer_loss"]
        metrics["loss"] = metrics["loss"] + stats["indexer_loss"]
    if "expert_load" in stats:
        load = stats["expert_load"]
        metrics.update({
            "moe/balance_loss": jnp.mean(stats["balance_loss"]),
            "moe/z_loss": jnp.mean(stats["z_loss"]),
            "moe/dropped_fraction": jnp.mean(stats["dropped_fraction"]),
            "moe/load_max_over_mean": jnp.max(load, -1) / jnp.mean(load, -1),
            "moe/bias_norm": optax.tree.norm(new_bias)})
    return metrics


def bias_update_rates(cfg: Config) -> dict[str, Any]:
    """moe_bias variable -> its update rate: a scalar, or [L, 1] rows for DeepSeek-V4,
    whose hash-routed layers never read their bias row (it stays 0, as in checkpoints)."""
    rate = cfg.model.moe.bias_update_rate
    rates: dict[str, Any] = {name: rate for name in BIAS_LOADS}
    if cfg.model.architecture == "deepseek_v4":
        learned = [not cfg.model.is_hash(layer) for layer in range(cfg.model.num_layers)]
        rates["bias"] = rate * jnp.asarray(learned, jnp.float32)[:, None]
    return rates


def train_step_fn(setup: TrainSetup, cfg: Config
                  ) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
    """The pure step: (state, batch, seed_key) -> (next state, metrics of this step)."""
    rates = bias_update_rates(cfg)
    mtp_weight = cfg.model.mtp.loss_weight if mtp_depth(cfg) else 0.0

    def step(state: TrainState, batch: Batch, seed_key: jax.Array
             ) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(seed_key, state.step)
        grads, stats = gradients(setup, cfg, state, batch, rng)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        moe_bias = {name: update_balance_bias(bias, stats[BIAS_LOADS[name]], rates[name])
                    for name, bias in state.moe_bias.items()}
        lr = jnp.asarray(setup.schedule(state.step), jnp.float32)
        metrics = _step_metrics(stats, optax.tree.norm(grads), lr, moe_bias, mtp_weight)
        return TrainState(state.step + 1, params, opt_state, moe_bias, state.frozen), metrics
    return step


def make_train_step(setup: TrainSetup, cfg: Config
                    ) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
    """`train_step_fn` jitted once: explicit in/out shardings, the state donated."""
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    rows = batch_sharding(setup.mesh, cfg.train.batch_size, cfg.train.seq_len)
    return jax.jit(train_step_fn(setup, cfg),
                   in_shardings=(setup.shardings, rows, replicated),
                   out_shardings=(setup.shardings, replicated), donate_argnums=(0,))


def make_eval_step(setup: TrainSetup, batch_size: int, seq_len: int
                   ) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """Jitted (state, batch) -> {"nll": summed target NLL (nats), "count": targets}."""
    replicated = NamedSharding(setup.mesh, PartitionSpec())

    def step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        logits, _ = setup.model.apply(state.variables(), batch["tokens"],
                                      batch["segment_ids"], batch["positions"])
        nll, count = token_nll(logits, batch["tokens"], batch["segment_ids"])
        return {"nll": nll, "count": count}

    return jax.jit(step, in_shardings=(setup.shardings,
                                       batch_sharding(setup.mesh, batch_size, seq_len)),
                   out_shardings=replicated)
