"""Train a moejax model: `python train.py --config configs/tiny.py --workdir DIR`.

Any config field can be overridden on the command line with its dotted name
(`--config.train.steps=100 --config.model.moe.num_experts=16`); the config is locked, so an
unknown field is an error. A workdir that already holds checkpoints of the same model is
resumed from its newest complete one. Multi-host: pass `--multihost`, or set
JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES / JAX_PROCESS_ID where JAX cannot detect
them), and `jax.distributed.initialize()` runs before anything touches a device
(moejax/distributed.py); only process 0 writes config.json, metrics and TensorBoard.

Writes DIR/config.json, DIR/metrics.jsonl, DIR/tensorboard/ and DIR/checkpoints/. Bad input
(config, data, an incompatible workdir) exits with status 1 and one line saying what to
fix, before anything is written. A step whose loss or gradient is NaN/inf stops the run
with status 1 naming the step and the terms (`train.nonfinite`, moejax/train/guard.py).
A checkpoint that cannot be written (disk full) stops the run with status 1 naming the
folder and the newest complete checkpoint, which is kept.
SIGTERM / SIGINT: the step in flight is finished and saved, then status 0 with a line
naming the step (run the same command to resume); a second signal exits at once.
"""
import dataclasses
import json
import re
import signal
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import moejax.distributed
import moejax.train
from moejax.config import apply_overrides, load_config_file, resolve

DEFAULT_CONFIG = "configs/tiny.py"


def _bad_override(argv: list[str], error: Exception) -> str:
    """The unknown --config.* field named as moejax.config.apply_overrides words it."""
    path = DEFAULT_CONFIG
    for i, arg in enumerate(argv):
        if re.match(r"^--?config(=|$)", arg):
            path = arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
    overrides = [a.split(".", 1)[1] for a in argv if re.match(r"^--?config\.", a)]
    try:
        apply_overrides(load_config_file(path), [o if "=" in o else f"{o}=True"
                                                 for o in overrides])
    except (ValueError, FileNotFoundError) as e:
        return str(e)
    return f"bad --config override: {error}"


try:  # without --config the default file and its overrides are parsed right here
    _CONFIG = config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Experiment config file (get_config() -> ConfigDict).",
        lock_config=True)
except (AttributeError, KeyError) as _error:
    sys.exit(f"train.py: {_bad_override(sys.argv, _error)}")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.",
                               required=True)
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() (auto when "
    "JAX_COORDINATOR_ADDRESS is set; see moejax/distributed.py).")


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:  # an unknown field in a locked config
        sys.exit(f"train.py: {_bad_override(argv, e)}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    moejax.distributed.initialize(_MULTIHOST.value)
    try:
        cfg = resolve(_CONFIG.value)
    except ValueError as e:
        sys.exit(f"train.py: invalid config: {e}")
    if jax.process_index() == 0:
        print(json.dumps(dataclasses.asdict(cfg), indent=2), flush=True)
    try:
        final = moejax.train.train_and_evaluate(cfg, _WORKDIR.value)
    except (ValueError, FileNotFoundError) as e:  # bad input: nothing was written
        sys.exit(f"train.py: {e}")
    except moejax.train.NonFiniteError as e:  # the guard: nothing non-finite was saved
        sys.exit(f"train.py: {e}")
    except moejax.train.CheckpointWriteError as e:  # disk full: older checkpoints kept
        sys.exit(f"train.py: {e}")
    if jax.process_index() == 0:
        print(json.dumps(final, indent=2), flush=True)
        if "preempted" in final:
            number = int(final["preempted"])
            name = signal.Signals(number).name if number else "a signal to another process"
            print(f"train.py: stopped by {name} after step {final['step']}; its checkpoint "
                  f"is saved in {_WORKDIR.value}; run the same command to resume.", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
