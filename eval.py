"""Evaluate a moejax run: `python eval.py --config configs/tiny.py --workdir DIR`.

Restores the newest checkpoint in DIR (a damaged newer one is reported and renamed
`<step>.corrupt-<n>`, and the previous one is used; moejax/train/checkpoint.py); computes
validation loss, perplexity and bits per byte (next to the byte-unigram baseline), reports
expert usage per layer, samples from `--prompt` with the KV cache (greedy and
temperature/top-p), writes DIR/eval.json and prints a short summary. Config overrides and
`--multihost` work as in train.py; every process evaluates its rows of the batches,
process 0 writes eval.json.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/tiny.py", "Experiment config file (get_config() -> ConfigDict).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.",
                               required=True)
_PROMPT = flags.DEFINE_string("prompt", "def ", "Prompt of the samples.")
_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Tokens generated per sample.")
_BATCHES = flags.DEFINE_integer("num_batches", None, "Validation batches "
                                "(default: train.eval_batches).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() as "
                               "train.py does (auto when JAX_COORDINATOR_ADDRESS is set).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from moejax import distributed
    from moejax.config import resolve
    from moejax.eval import evaluate, summary_text

    distributed.initialize(_MULTIHOST.value)

    try:
        cfg = resolve(_CONFIG.value)
        result = evaluate(cfg, _WORKDIR.value, prompt=_PROMPT.value,
                          max_new_tokens=_NEW_TOKENS.value, num_batches=_BATCHES.value)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"eval.py: {e}")
    if distributed.is_primary():
        print(summary_text(result, cfg), flush=True)


if __name__ == "__main__":
    app.run(main)
