"""The non-finite guard: a step whose loss or gradient is not finite never reaches a checkpoint.

`guarded_step_fn` wraps the optimizer step (`step.update_fn`) and decides on device, from
the step's own scalars, whether the step is good; the host learns it only with the metrics
it already fetches (a logged step, one step late) and right before a checkpoint is saved,
so the guard adds no host-device synchronisation.

  terms      `guard_terms(cfg)`: loss, cross_entropy, mtp_cross_entropy (with MTP), the
             architecture's extra losses (V4: indexer_loss), moe_loss, grad_norm; a step
             is non-finite when any is NaN or +-inf. With gradient accumulation the terms
             are the sums over all micro-batches, so one bad micro-batch makes the step bad.
  policy     `train.nonfinite`:
               "stop"  the first non-finite step trips the guard; the host stops the run
                       (`NonFiniteError`, naming the step and the terms) before any later
                       checkpoint is written.
               "skip"  a non-finite step keeps params, optimizer state and balance biases
                       as they were (a select on device; the step count, the data and the
                       RNG move on); more than `train.max_skipped_steps` skipped steps in
                       a row trip the guard.
  spikes     with `train.spike_factor` k > 0, a finite step whose loss exceeds k x the
             median of the last `train.spike_window` accepted losses is skipped too (both
             policies; counted in the same row). The window starts empty at every (re)start.

The `Guard` pytree rides along the step (replicated, a few scalars and the loss window);
`skipped_steps` (skipped since this process started) is logged with every record.
Independently, the loop checks `finite_check(state)` before every save: a checkpoint never
holds a NaN or inf.
"""
from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from moejax.config import Config
from moejax.model.build import architecture_of
from moejax.train.loss import mtp_depth
from moejax.train.state import TrainSetup, TrainState
from moejax.train.step import Batch, batch_sharding, update_fn

SPIKE = "loss_spike"  # the pseudo-term of a step skipped for a loss spike


class NonFiniteError(RuntimeError):
    """The guard tripped: the run stops without saving the bad state."""


@flax.struct.dataclass
class Guard:
    """What the guard carries from step to step (every leaf a replicated scalar or [W])."""
    skipped: jax.Array  # int32: steps skipped since this process started
    run: jax.Array  # int32: skipped steps in a row, ending with the last step
    tripped_step: jax.Array  # int32: the step (count after it) that tripped; -1: none
    tripped_terms: jax.Array  # int32 bit mask over guard_terms(cfg) + (SPIKE,) of that step
    losses: jax.Array  # float32 [spike_window]: ring of the last accepted losses
    filled: jax.Array  # int32: accepted losses written into the ring so far


def guard_terms(cfg: Config) -> tuple[str, ...]:
    """Names of the checked scalars, in the order of their bits in `Guard.tripped_terms`."""
    mtp = ("mtp_cross_entropy",) if mtp_depth(cfg) else ()
    return ("loss", "cross_entropy", *mtp, *architecture_of(cfg.model).extra_losses,
            "moe_loss", "grad_norm")


def init_guard(cfg: Config) -> Guard:
    """A fresh guard (host arrays; the jitted step places them replicated)."""
    return Guard(skipped=np.int32(0), run=np.int32(0), tripped_step=np.int32(-1),
                 tripped_terms=np.int32(0),
                 losses=np.zeros(cfg.train.spike_window, np.float32), filled=np.int32(0))


def _is_spike(guard: Guard, loss: jax.Array, factor: float) -> jax.Array:
    """loss > factor x median of a full window of accepted losses."""
    full = guard.filled >= guard.losses.shape[0]
    return full & (loss > factor * jnp.median(guard.losses))


def guarded_step_fn(setup: TrainSetup, cfg: Config
                    ) -> Callable[[TrainState, Guard, Batch, jax.Array],
                                  tuple[TrainState, Guard, dict]]:
    """(state, guard, batch, seed_key) -> (next state, next guard, metrics); see the module
    docstring. Under "stop" without spikes nothing is selected (a bad state is never saved
    because the host stops first)."""
    t = cfg.train
    update, names = update_fn(setup, cfg), guard_terms(cfg)
    selects = t.nonfinite == "skip" or t.spike_factor > 0

    def step(state: TrainState, guard: Guard, batch: Batch, seed_key: jax.Array
             ) -> tuple[TrainState, Guard, dict[str, jax.Array]]:
        new, metrics, terms = update(state, batch, seed_key)
        assert tuple(terms) == names, (tuple(terms), names)
        bad = jnp.stack([~jnp.isfinite(terms[n]) for n in names])
        nonfinite = jnp.any(bad)
        spike = (_is_spike(guard, terms["loss"], t.spike_factor) & ~nonfinite
                 if t.spike_factor > 0 else jnp.zeros((), bool))
        skip = spike | (nonfinite if t.nonfinite == "skip" else jnp.zeros((), bool))
        if selects:
            keep = lambda n, o: jnp.where(skip, o, n)  # noqa: E731
            new = TrainState(new.step, jax.tree.map(keep, new.params, state.params),
                             jax.tree.map(keep, new.opt_state, state.opt_state),
                             jax.tree.map(keep, new.moe_bias, state.moe_bias), new.frozen)
        run = jnp.where(skip, guard.run + 1, 0)
        trip = run > t.max_skipped_steps
        if t.nonfinite == "stop":
            trip = trip | nonfinite
        first = trip & (guard.tripped_step < 0)
        mask = jnp.sum(jnp.concatenate([bad, spike[None]]).astype(jnp.int32)
                       << jnp.arange(len(names) + 1, dtype=jnp.int32))
        accepted = ~skip & ~nonfinite
        window = guard.losses.shape[0]
        losses = jnp.where(accepted, guard.losses.at[guard.filled % window].set(
            terms["loss"].astype(jnp.float32)), guard.losses)
        guard = Guard(skipped=guard.skipped + skip.astype(jnp.int32), run=run,
                      tripped_step=jnp.where(first, new.step, guard.tripped_step),
                      tripped_terms=jnp.where(first, mask, guard.tripped_terms),
                      losses=losses, filled=guard.filled + accepted.astype(jnp.int32))
        metrics["skipped_steps"] = guard.skipped.astype(jnp.float32)
        return new, guard, metrics
    return step


def make_guarded_step(setup: TrainSetup, cfg: Config
                      ) -> Callable[[TrainState, Guard, Batch, jax.Array],
                                    tuple[TrainState, Guard, dict]]:
    """`guarded_step_fn` jitted once, the state donated (the guard is not: the logger
    still holds the guard of a logged step when the next step runs)."""
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    rows = batch_sharding(setup.mesh, cfg.train.batch_size, cfg.train.seq_len)
    return jax.jit(guarded_step_fn(setup, cfg),
                   in_shardings=(setup.shardings, replicated, rows, replicated),
                   out_shardings=(setup.shardings, replicated, replicated),
                   donate_argnums=(0,))


def tripped_terms(cfg: Config, mask: int) -> list[str]:
    """The names of the bits set in a `Guard.tripped_terms` mask."""
    return [n for i, n in enumerate((*guard_terms(cfg), SPIKE)) if mask >> i & 1]


def check_guard(cfg: Config, guard: Guard, last_saved: int | None
                ) -> None:
    """Raises NonFiniteError naming the step and the terms if `guard` (fetched) tripped."""
    step = int(guard.tripped_step)
    if step < 0:
        return
    names = tripped_terms(cfg, int(guard.tripped_terms))
    terms = ", ".join(names) or "none"
    kept = (f"the newest checkpoint is step {last_saved}" if last_saved is not None
            else "no checkpoint was written")
    fix = ("lower optimizer.learning_rate, set optimizer.grad_clip_norm > 0 or check the "
           "data of that step")
    if cfg.train.nonfinite == "stop" and set(names) - {SPIKE}:
        raise NonFiniteError(
            f"step {step} is not finite ({terms}); train.nonfinite='stop' ended the run "
            f"without saving it ({kept}). To go on, {fix}, or set train.nonfinite='skip'.")
    raise NonFiniteError(
        f"step {step} made {cfg.train.max_skipped_steps + 1} skipped steps in a row (its "
        f"bad terms: {terms}); train.max_skipped_steps={cfg.train.max_skipped_steps} "
        f"ended the run without saving it ({kept}). To go on, {fix}.")


def _all_finite(state: TrainState) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(state)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def finite_check(setup: TrainSetup) -> Callable[[TrainState], jax.Array]:
    """Jitted `state -> bool` (replicated): every float leaf of the state is finite."""
    return jax.jit(_all_finite, in_shardings=(setup.shardings,),
                   out_shardings=NamedSharding(setup.mesh, PartitionSpec()))
