"""moejax training: train state, steps, optimizer, metrics, checkpoints, the host loop.

    metrics = moejax.train.train_and_evaluate(config, workdir)   # ConfigDict or Config

Pieces for notebooks and tests::

    setup = make_setup(cfg, mesh)              # model, optax tx, sharded abstract state
    state = init_state(setup, jax.random.key(0))
    train_step = make_train_step(setup, cfg)   # jitted once, state donated
    state, metrics = train_step(state, batch, seed_key)
"""
from moejax.train.checkpoint import CheckpointWriteError
from moejax.train.guard import NonFiniteError, make_guarded_step
from moejax.train.loop import check_inputs, train_and_evaluate
from moejax.train.metrics import MetricsWriter, flops_per_token, peak_flops_per_device
from moejax.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer
from moejax.train.state import TrainSetup, TrainState, init_state, make_setup, param_count
from moejax.train.loss import batch_loss, loss_metrics, target_mask, token_nll
from moejax.train.step import batch_sharding, global_batch, make_train_step, train_step_fn

__all__ = [
    "CheckpointWriteError", "MetricsWriter", "NonFiniteError", "TrainSetup", "TrainState",
    "batch_loss",
    "batch_sharding", "check_inputs", "decay_mask", "flops_per_token", "global_batch",
    "init_state", "learning_rate_schedule", "loss_metrics", "make_guarded_step",
    "make_optimizer", "make_setup", "make_train_step", "param_count", "peak_flops_per_device",
    "target_mask", "token_nll", "train_and_evaluate", "train_step_fn",
]
