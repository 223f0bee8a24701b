"""moejax evaluation: held-out loss / bits per byte, expert usage, KV-cached sampling.

    result = moejax.evaluate(config, workdir)   # also writes <workdir>/eval.json
"""
from moejax.eval.generate import generate, sample_logits
from moejax.train.heldout import HeldOut, make_heldout_step, unigram_baseline
from moejax.eval.run import evaluate, summary_text

__all__ = ["HeldOut", "evaluate", "generate", "make_heldout_step", "sample_logits",
           "summary_text", "unigram_baseline"]
