"""The host loop: `train_and_evaluate(config, workdir)`.

Order of work, so that a bad input fails before anything is written:

  1. resolve and validate the config; build the tokenizer; `check_enough_data` (every
     ValueError names the field to fix);
  2. build the mesh, the model, the optimizer and the sharded abstract state;
  3. `checkpoint.check_compatible`: a workdir holding a checkpoint of another model is an
     error (read-only look);
  4. only now: create the workdir, check that its checkpoint folder takes a file (a
     read-only workdir is an `UnwritableWorkdir` ValueError naming the path), write
     `config.json`, open the metrics writers and the checkpoint manager; resume from the
     newest complete checkpoint or initialise;
  5. the step loop: host batch -> global jax.Array -> the guarded step (`guard.py`,
     jitted once, state donated); metrics of a logged step are fetched after the *next*
     step is dispatched, so the host never waits for the device just to log; a tripped
     non-finite guard seen there (or before a save) raises `NonFiniteError`; checkpoints
     every `train.save_every` steps and at the end, each only after the guard and
     `finite_check` passed (a save that fails to write raises `CheckpointWriteError`,
     older checkpoints kept, within a step or two of the failure, every process at the
     same step: `preemption.py`); validation every `train.eval_every` steps; a SIGTERM /
     SIGINT (`preemption.py`) saves after the step in flight and returns early;
  6. a final validation pass (and `eval_hook` if given), skipped after a preemption; the
     manager is always waited on and closed, the writers closed, whatever happens.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Mapping

import jax
import ml_collections
from etils import epath
from tqdm.auto import tqdm

from moejax import data as moedata
from moejax.config import Config, resolve
from moejax import distributed
from moejax.distributed import BatchLayout
from moejax.sharding import make_mesh, use_mesh
from moejax.storage import as_path
from moejax.train import checkpoint, wandb_tracker
from moejax.train.metrics import (LOAD_IMAGE_LOGS, MetricsWriter, flops_per_token,
                                  host_metrics, peak_flops_per_device, throughput)
from moejax.train.state import TrainSetup, TrainState, init_state, make_setup, param_count
from moejax.train.guard import (Guard, NonFiniteError, check_guard, finite_check, init_guard,
                                make_guarded_step)
from moejax.train.heldout import HeldOut
from moejax.train.preemption import Preemption
from moejax.train.step import batch_sharding

EvalHook = Callable[[TrainState, Config], Mapping[str, float]]


def check_inputs(cfg: Config, workdir: str | os.PathLike | None = None, *,
                 train_tokenizer: bool = True
                 ) -> tuple[moedata.Tokenizer, moedata.DataSummary]:
    """Tokenizer and data summary; raises ValueError naming the fix (touches no file).

    A 'bpe:N' tokenizer is read from `<workdir>/tokenizer.json` when there is one, else
    trained in memory (with `train_tokenizer`; `moedata.save_tokenizer` writes it later).
    """
    tokenizer = moedata.tokenizer_for_run(cfg.data, workdir, train=train_tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size} ids of {tokenizer!r}); raise model.vocab_size.")
    summary = moedata.check_enough_data(
        cfg.data, tokenizer, cfg.train.seq_len, cfg.train.batch_size, jax.process_count(),
        evaluate=cfg.data.validation_fraction > 0)
    return tokenizer, summary


class Logger:
    """Fetches logged steps' metrics one step late, adds throughput/MFU, writes them."""

    def __init__(self, cfg: Config, writer: MetricsWriter, start_step: int, bar: tqdm,
                 check: Callable[[Guard], None]):
        self.writer, self.bar, self.check = writer, bar, check
        self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        self.flops = flops_per_token(cfg.model, cfg.train.seq_len)
        self.peak = peak_flops_per_device(override=cfg.train.peak_flops_per_device)
        self.pending: tuple[int, Any, Guard] | None = None
        self.last_step, self.last_time = start_step, time.perf_counter()
        self.latest: dict[str, Any] = {}

    def queue(self, step: int, device_metrics: Any, guard: Guard) -> None:
        """Remembers a dispatched step's metrics and guard; the next `flush` fetches them."""
        self.flush()
        self.pending = (step, device_metrics, guard)

    def flush(self) -> None:
        """Fetches (waits for) the pending step, writes its record, then checks its guard."""
        if self.pending is None:
            return
        step, device_metrics, guard = self.pending
        self.pending = None
        raw, guard = jax.device_get((device_metrics, guard))
        values = host_metrics(raw)
        self.writer.write_expert_load(step, raw.get("moe/expert_load"))
        now = time.perf_counter()
        step_time = (now - self.last_time) / max(step - self.last_step, 1)
        values.update(throughput(step_time, self.tokens_per_step, self.flops, self.peak,
                                 jax.device_count()))
        self.last_step, self.last_time = step, now
        self.write(step, values)
        self.bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
        self.check(guard)

    def restart_clock(self, step: int) -> None:
        """Starts the next step_time interval now, at `step` (after non-training work)."""
        self.last_step, self.last_time = step, time.perf_counter()

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        self.latest.update(values)
        self.writer.write(step, values)


def _say(message: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(message)


def _start(setup: TrainSetup, cfg: Config, workdir: epath.Path, manager: Any,
           train_it: Any) -> TrainState:
    """Resumes from the newest checkpoint that restores (damaged newer ones are set aside,
    see checkpoint.py), or initialises a fresh state."""
    state, step = checkpoint.restore_newest(manager, setup.abstract, train_it, cfg)
    if step is None:
        state = init_state(setup, rng_keys(cfg)[0])
        _say(f"initialised {param_count(state):,} parameters in {workdir}")
        return state
    _say(f"resumed from the checkpoint at step {step} in {workdir}")
    return state


def rng_keys(cfg: Config) -> tuple[jax.Array, jax.Array]:
    """(parameter-init key, seed key of the per-step RNG fold_in(seed_key, step))."""
    init_key, seed_key = jax.random.split(jax.random.key(cfg.train.seed))
    return init_key, seed_key


def _should_log(done: int, start: int, cfg: Config) -> bool:
    return done % cfg.train.log_every == 0 or done == start + 1 or done == cfg.train.steps


class CheckedSaver:
    """Saves a checkpoint only after the guard and a finiteness check of the state passed."""

    def __init__(self, setup: TrainSetup, cfg: Config, manager: Any, train_it: Any):
        self.cfg, self.manager, self.train_it = cfg, manager, train_it
        self.finite = finite_check(setup)
        self.pending: int | None = None  # the step of the save being written
        self.error: checkpoint.CheckpointWriteError | None = None  # of the pending save

    def check(self, guard: Guard) -> None:
        """Raises NonFiniteError if `guard` (fetched) tripped."""
        check_guard(self.cfg, guard, self.manager.latest_step())

    def save(self, step: int, state: TrainState, guard: Guard) -> None:
        self.check(jax.device_get(guard))  # the save waits for this step anyway
        if not bool(self.finite(state)):
            raise NonFiniteError(
                f"the state after step {step} holds NaN or inf although its loss and "
                f"gradient were finite; not saved (the newest checkpoint is step "
                f"{self.manager.latest_step()}).")
        self.wait()
        try:
            checkpoint.save(self.manager, step, state, self.train_it, self.cfg)
        except Exception as e:  # noqa: BLE001 - any failure to write is reported so
            raise checkpoint.write_error(self.manager, step, e) from e
        self.pending = step

    def failed(self) -> bool:
        """Whether the save in flight has failed, without waiting for it (Orbax writes in
        a background thread and reports its error once, so it is kept here)."""
        if self.pending is not None and self.error is None:
            try:
                self.manager.check_for_errors()
            except Exception as e:  # noqa: BLE001
                self.error = checkpoint.write_error(self.manager, self.pending, e)
        return self.error is not None

    def raise_failure(self) -> None:
        """Raises the CheckpointWriteError of the failed save (all processes agreed that
        one failed; on a process whose own write has not failed it names the step)."""
        error = self.error or checkpoint.CheckpointWriteError(
            f"the checkpoint of step {self.pending} failed to write on another process; "
            f"the newest complete one, step {self.manager.latest_step()}, is kept.")
        self.error = self.pending = None
        raise error

    def wait(self) -> None:
        """Waits for the save in flight; raises CheckpointWriteError naming its step if
        it failed (Orbax writes in a background thread, so that is where it fails)."""
        if self.error is not None:
            self.raise_failure()
        step, self.pending = self.pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise checkpoint.write_error(self.manager, step, e) from e


def _close(manager: Any, saver: CheckedSaver | None, quiet: bool) -> None:
    """Waits for the last save and closes the manager. A failed save raises
    CheckpointWriteError, or with `quiet` (another error is on its way) is printed."""
    error = None
    try:
        if saver is not None:
            saver.wait()
    except checkpoint.CheckpointWriteError as e:
        error = e
    try:
        checkpoint.close(manager)
    except Exception as e:  # noqa: BLE001
        error = error or checkpoint.write_error(manager, None, e)
    if error is not None and not quiet:
        raise error
    if error is not None:
        print(f"also: {error}", file=sys.stderr, flush=True)


def _train(setup: TrainSetup, cfg: Config, state: TrainState, train_it: Any,
           saver: CheckedSaver, logger: Logger, validation: Any, preemption: Preemption
           ) -> tuple[TrainState, bool]:
    """The step loop from `state.step` to `train.steps` (see the module docstring);
    returns the state and whether a signal stopped it early (after saving)."""
    t = cfg.train
    start = int(state.step)
    train_step = make_guarded_step(setup, cfg)
    layout = BatchLayout(batch_sharding(setup.mesh, t.batch_size, t.seq_len),
                         t.batch_size, t.seq_len)
    seed_key = rng_keys(cfg)[1]
    guard = init_guard(cfg)
    for step in range(start, t.steps):
        state, guard, metrics = train_step(state, guard, layout.to_global(next(train_it)),
                                           seed_key)
        done = step + 1
        stop = preemption.stop_after_this_step(save_failed=saver.failed())
        if preemption.save_failed:  # stop now, not at the next save (see preemption.py)
            logger.flush()
            saver.raise_failure()
        if _should_log(done, start, cfg) or stop:
            logger.queue(done, metrics, guard)
        else:
            logger.flush()
        if done % t.save_every == 0 or done == t.steps or stop:
            saver.save(done, state, guard)
        if stop:
            _say(f"{preemption.name}: saving the checkpoint of step {done} and stopping.")
            logger.flush()
            return state, True
        if t.eval_every and done % t.eval_every == 0 and done < t.steps:
            logger.flush()
            logger.write(done, validation(state))
            logger.restart_clock(done)  # keep validation time out of step_time
        logger.bar.update(1)
    logger.flush()
    return state, False


class UnwritableWorkdir(ValueError):
    """The workdir (or its checkpoint folder) cannot be written; nothing was trained."""


def _write_config(workdir: epath.Path, cfg: Config, tokenizer: moedata.Tokenizer) -> None:
    """Creates the workdir and writes config.json (and a freshly trained BPE's
    tokenizer.json), after checking that the checkpoint folder takes a file (a probe,
    removed at once), so that a read-only workdir fails here, naming the path, instead of
    at the first save."""
    path = workdir
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            path = checkpoint.checkpoint_dir(workdir)
            path.mkdir(exist_ok=True)
            path = path / f".moejax-write-test-{os.getpid()}"
            path.write_text("ok\n")
            path.unlink()
            path = workdir / "config.json"
            text = json.dumps(checkpoint.config_dict(cfg), indent=2)
            path.write_text(text + "\n", encoding="utf-8")
            path = workdir / moedata.TOKENIZER_FILE
            moedata.save_tokenizer(tokenizer, workdir)  # a trained 'bpe:N' (once)
    except OSError as e:
        raise UnwritableWorkdir(
            f"workdir {os.fspath(workdir)!r} cannot be written: {e.strerror or e} "
            f"({os.fspath(path)}); use a writable --workdir (or free space). Nothing was "
            "trained, and no checkpoint in it was changed.") from e


def train_and_evaluate(config: ml_collections.ConfigDict | Config, workdir: str | os.PathLike,
                       *, eval_hook: EvalHook | None = None) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming from its newest checkpoint), then evaluates.

    Returns the last logged train metrics (per-MoE-layer ones as lists), the final
    validation metrics (`validation/cross_entropy`, `validation/perplexity`,
    `validation/bits_per_byte`, when data.validation_fraction > 0), whatever
    `eval_hook(state, cfg)` returns, and `step`,
    the final state's step. Raises ValueError (before writing anything) for a bad config,
    missing or too little data, or a workdir holding another model's checkpoint;
    `NonFiniteError` when the non-finite guard stops the run (nothing non-finite saved).
    A SIGTERM / SIGINT (first one; a second exits at once) saves the step in flight and
    returns early, without final validation, with `preempted` set to the signal number
    (0 on a process that stopped because another one got the signal).
    """
    cfg = config if isinstance(config, Config) else resolve(config)
    workdir = as_path(workdir)  # a local folder or a URL (moejax.storage)
    tokenizer, summary = check_inputs(cfg, workdir)
    wandb_tracker.check_available(cfg.train.wandb_project)
    mesh = make_mesh(cfg.mesh)
    with use_mesh(mesh):
        setup = make_setup(cfg, mesh)
        checkpoint.check_compatible(workdir, cfg)
        distributed.sync("moejax: workdir checked")  # before any process creates in it
        _write_config(workdir, cfg, tokenizer)
        try:
            primary = jax.process_index() == 0
            writer = MetricsWriter(workdir, enabled=primary,
                                   first_moe_layer=cfg.model.num_dense_layers,
                                   load_every=LOAD_IMAGE_LOGS * cfg.train.log_every,
                                   tracker=wandb_tracker.open_tracker(cfg, workdir, primary))
        except OSError as e:
            raise UnwritableWorkdir(f"workdir {os.fspath(workdir)!r}: cannot open its "
                                    f"metrics for writing: {e}.") from e
        manager = checkpoint.make_manager(workdir, cfg.train.keep_checkpoints)
        t = cfg.train
        rows = BatchLayout(batch_sharding(mesh, t.batch_size, t.seq_len), t.batch_size,
                           t.seq_len).rows  # this process's rows of every global batch
        train_it = moedata.make_train_iterator(cfg.data, tokenizer, t.seq_len, t.batch_size,
                                               rows=rows)
        bar, saver, failed = None, None, False
        try:
            with Preemption() as preemption:
                state = _start(setup, cfg, workdir, manager, train_it)
                bar = tqdm(total=cfg.train.steps, initial=int(state.step), desc="train",
                           disable=jax.process_index() != 0, dynamic_ncols=True)
                saver = CheckedSaver(setup, cfg, manager, train_it)
                logger = Logger(cfg, writer, int(state.step), bar, saver.check)
                validation = HeldOut(setup, cfg, tokenizer, min(cfg.train.eval_batches,
                                                                summary.validation_batches))
                state, stopped = _train(setup, cfg, state, train_it, saver, logger,
                                        validation, preemption)
                if stopped:
                    return {**logger.latest, "step": int(state.step),
                            "preempted": float(preemption.signal or 0)}
            final = validation(state)
            if eval_hook is not None:
                final.update(eval_hook(state, cfg))
            logger.write(int(state.step), final)
            _say(" ".join(f"{k}={v:.4g}" for k, v in final.items()))
            return {**logger.latest, "step": int(state.step)}
        except BaseException:
            failed = True
            raise
        finally:
            if bar is not None:
                bar.close()
            _close(manager, saver, quiet=failed)
            writer.close()
            if hasattr(train_it, "close"):
                train_it.close()
