"""Evaluate a moejax run: `moejax-eval --config tiny --workdir DIR` (or `python eval.py`).

Restores the newest checkpoint in DIR (a damaged newer one is reported and renamed
`<step>.corrupt-<n>`, and the previous one is used; moejax/train/checkpoint.py); computes
validation loss, perplexity and bits per byte (next to the byte-unigram baseline), reports
expert usage per layer, samples from `--prompt` with the KV cache (greedy and
temperature/top-p), writes DIR/eval.json (and the plots DIR/loss.png and
DIR/expert_load.png, moejax.plot) and prints a short summary. `--config` (a file
or a built-in name), its overrides and `--multihost` work as in moejax-train; every
process evaluates its rows of the batches, process 0 writes eval.json.
"""
from __future__ import annotations

import dataclasses
import functools
import sys

from absl import app, flags, logging

from moejax import distributed
from moejax.cli.config_flag import (define_config_flag, program_name, set_usage,
                                     show_in_help)
from moejax.config import resolve
from moejax.eval import evaluate, summary_text


@dataclasses.dataclass(frozen=True)
class _Flags:
    config: flags.FlagHolder
    workdir: flags.FlagHolder
    prompt: flags.FlagHolder
    max_new_tokens: flags.FlagHolder
    num_batches: flags.FlagHolder
    multihost: flags.FlagHolder


def _define_flags() -> _Flags:
    parsed = _Flags(
        config=define_config_flag(),
        workdir=flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.",
                                    required=True),
        # No trailing space: a BPE writes a space with the word after it, so a prompt
        # ending in one starts off text the model rarely saw (tiny.py: junk after "def ").
        prompt=flags.DEFINE_string("prompt", "def", "Prompt of the samples."),
        max_new_tokens=flags.DEFINE_integer("max_new_tokens", 200,
                                            "Tokens generated per sample."),
        num_batches=flags.DEFINE_integer("num_batches", None, "Validation batches "
                                         "(default: train.eval_batches)."),
        multihost=flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() "
                                    "as moejax-train does (auto when JAX_COORDINATOR_ADDRESS "
                                    "is set)."))
    show_in_help(["config", "workdir", "prompt", "max_new_tokens", "num_batches", "multihost"])
    return parsed


def main(parsed: _Flags, argv: list[str]) -> None:
    """Evaluates the newest checkpoint and prints the summary (process 0)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    distributed.initialize(parsed.multihost.value)
    try:
        cfg = resolve(parsed.config.value)
        result = evaluate(cfg, parsed.workdir.value, prompt=parsed.prompt.value,
                          max_new_tokens=parsed.max_new_tokens.value,
                          num_batches=parsed.num_batches.value)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"{program_name()}: {e}")
    if distributed.is_primary():
        print(summary_text(result, cfg), flush=True)


def run() -> None:
    """The console script `moejax-eval` (and `python eval.py`)."""
    set_usage(__doc__)
    app.run(functools.partial(main, _define_flags()))


if __name__ == "__main__":
    run()
