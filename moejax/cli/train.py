"""Train a moejax model: `moejax-train --config tiny --workdir DIR` (or `python train.py`).

`--config` is a config file (`configs/tiny.py`, `configs/deepseek_v4.py:flash`) or the
name of a built-in one (`tiny`, `deepseek_v4:flash`); default `tiny`. Any config field can
be overridden on the command line with its dotted name (`--config.train.steps=100
--config.model.moe.num_experts=16`); the config is locked, so an unknown field is an
error. A workdir that already holds checkpoints of the same model is resumed from its
newest complete one. Multi-host: pass `--multihost`, or set JAX_COORDINATOR_ADDRESS (with
JAX_NUM_PROCESSES / JAX_PROCESS_ID where JAX cannot detect them), and
`jax.distributed.initialize()` runs before anything touches a device
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
from __future__ import annotations

import dataclasses
import functools
import json
import re
import signal
import sys

import jax
from absl import app, flags, logging

from moejax import distributed
from moejax.cli.config_flag import (DEFAULT_CONFIG, define_config_flag, program_name,
                                     set_usage, show_in_help)
from moejax.config import apply_overrides, load_config_file, resolve
from moejax.train import CheckpointWriteError, NonFiniteError, train_and_evaluate


@dataclasses.dataclass(frozen=True)
class _Flags:
    config: flags.FlagHolder
    workdir: flags.FlagHolder
    multihost: flags.FlagHolder


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


def _define_flags() -> _Flags:
    try:  # without --config the default config and its overrides are parsed right here
        config = define_config_flag()
    except (AttributeError, KeyError) as error:
        sys.exit(f"{program_name()}: {_bad_override(sys.argv, error)}")
    parsed = _Flags(
        config=config,
        workdir=flags.DEFINE_string("workdir", None, "Directory for checkpoints and "
                                    "metrics.", required=True),
        multihost=flags.DEFINE_bool(
            "multihost", False, "Call jax.distributed.initialize() (auto when "
            "JAX_COORDINATOR_ADDRESS is set; see moejax/distributed.py)."))
    show_in_help(["config", "workdir", "multihost"])
    return parsed


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:  # an unknown field in a locked config
        sys.exit(f"{program_name()}: {_bad_override(argv, e)}")


def main(parsed: _Flags, argv: list[str]) -> None:
    """Resolves the config, prints it, trains; every expected failure is one line."""
    prog = program_name()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    distributed.initialize(parsed.multihost.value)
    try:
        cfg = resolve(parsed.config.value)
    except ValueError as e:
        sys.exit(f"{prog}: invalid config: {e}")
    if jax.process_index() == 0:
        print(json.dumps(dataclasses.asdict(cfg), indent=2), flush=True)
    workdir = parsed.workdir.value
    try:
        final = train_and_evaluate(cfg, workdir)
    except (ValueError, FileNotFoundError) as e:  # bad input: nothing was written
        sys.exit(f"{prog}: {e}")
    except NonFiniteError as e:  # the guard: nothing non-finite was saved
        sys.exit(f"{prog}: {e}")
    except CheckpointWriteError as e:  # disk full: older checkpoints kept
        sys.exit(f"{prog}: {e}")
    if jax.process_index() == 0:
        print(json.dumps(final, indent=2), flush=True)
        if "preempted" in final:
            number = int(final["preempted"])
            name = signal.Signals(number).name if number else "a signal to another process"
            print(f"{prog}: stopped by {name} after step {final['step']}; its checkpoint "
                  f"is saved in {workdir}; run the same command to resume.", flush=True)


def run() -> None:
    """The console script `moejax-train` (and `python train.py`)."""
    set_usage(__doc__)
    app.run(functools.partial(main, _define_flags()), flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
