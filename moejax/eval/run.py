"""`evaluate(config, workdir)`: restore the newest checkpoint, measure, sample, report.

Writes `<workdir>/eval.json` with `step`, `loss` (validation cross-entropy, nats/token),
`perplexity`, `bits_per_byte`, `unigram_bits_per_byte` (the byte-frequency baseline on
the same bytes), `gzip_bits_per_byte` and `xz_bits_per_byte` (Python's gzip at level 9
and lzma at preset 9|EXTREME on exactly the UTF-8 bytes the bits/byte denominator
counts, concatenated in order; moejax/eval/baselines.py), `expert_load` (per MoE layer,
each expert's share of the routed pairs), `samples` (greedy and nucleus samples from
`prompt`, KV-cached decoding) and `plots`: the paths of `<workdir>/loss.png` (train and
validation cross-entropy from metrics.jsonl) and `<workdir>/expert_load.png` (heatmap of
`expert_load`), see moejax.plot.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from moejax.config import Config, resolve
from moejax.eval.baselines import compression_baselines
from moejax.eval.generate import generate
from moejax.plot import write_eval_plots
from moejax.train.heldout import HeldOut, expert_usage_table, unigram_baseline
from moejax.sharding import make_mesh, use_mesh
from moejax.storage import as_path
from moejax.train import checkpoint
from moejax.train.loop import check_inputs
from moejax.train.state import make_setup

SAMPLING = ({"temperature": 0.0, "top_p": 1.0}, {"temperature": 0.8, "top_p": 0.95})


def _samples(cfg: Config, variables: Any, tokenizer: Any, prompt: str, max_new_tokens: int,
             seed: int) -> list[dict[str, Any]]:
    ids = np.asarray(tokenizer.encode(prompt), np.int32)
    max_new_tokens = min(max_new_tokens, cfg.model.max_seq_len - len(ids))
    out = []
    for i, sampling in enumerate(SAMPLING):
        tokens = generate(cfg.model, variables, ids, 1, max_new_tokens,
                          jax.random.key(seed + i), **sampling)
        out.append({**sampling, "prompt": prompt,
                    "text": tokenizer.decode(tokens[0, len(ids):].tolist())})
    return out


def _on_host(tree: Any) -> Any:
    """The whole of each array on this host (arrays sharded over processes are gathered)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def evaluate(config: ml_collections.ConfigDict | Config, workdir: str | os.PathLike, *,
             prompt: str = "def", max_new_tokens: int = 200, num_batches: int | None = None,
             seed: int = 0) -> dict[str, Any]:
    """Evaluates the newest checkpoint of `workdir`; returns what it writes to eval.json."""
    cfg = config if isinstance(config, Config) else resolve(config)
    workdir = as_path(workdir)  # a local folder or a URL (moejax.storage)
    step = checkpoint.latest_step(workdir)
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint.checkpoint_dir(workdir)}"
                                "; train first (train.py --workdir ...).")
    checkpoint.check_compatible(workdir, cfg)
    tokenizer, summary = check_inputs(cfg, workdir, train_tokenizer=False)
    batches = min(num_batches or cfg.train.eval_batches, summary.validation_batches)
    mesh = make_mesh(cfg.mesh)
    with use_mesh(mesh):
        setup = make_setup(cfg, mesh)
        state, step = checkpoint.load_newest_state(workdir, setup.abstract, cfg)
        metrics = HeldOut(setup, cfg, tokenizer, batches)(state, with_details=True)
        samples = _samples(cfg, _on_host(state.variables()), tokenizer, prompt,
                           max_new_tokens, seed)
    if not metrics:
        raise ValueError("the validation split yielded no targets; raise "
                         "data.validation_fraction or add documents.")
    result = {
        "step": int(step),
        "loss": metrics["validation/cross_entropy"],
        "perplexity": metrics["validation/perplexity"],
        "bits_per_byte": metrics["validation/bits_per_byte"],
        "unigram_bits_per_byte": unigram_baseline(cfg, metrics["evaluated_texts"]),
        **compression_baselines(metrics["evaluated_bytes"]),
        "expert_load": metrics["expert_load"],
        "samples": samples,
    }
    if jax.process_index() == 0:
        result["plots"] = _plots(workdir, result, cfg)
        (workdir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _plots(workdir: Any, result: dict[str, Any], cfg: Config) -> dict[str, str]:
    """loss.png and expert_load.png in `workdir`; none (with a note) without matplotlib."""
    try:
        return write_eval_plots(workdir, result["expert_load"], cfg.model.num_dense_layers,
                                result["step"])
    except ImportError as e:
        print(f"eval: no plots written: {e}", file=sys.stderr)
        return {}


def summary_text(result: dict[str, Any], cfg: Config) -> str:
    """A short human summary of an `evaluate` result."""
    lines = [f"step {result['step']}: loss {result['loss']:.4f} nats/token, perplexity "
             f"{result['perplexity']:.3f}",
             f"bits per byte {result['bits_per_byte']:.4f} (byte-unigram baseline "
             f"{result['unigram_bits_per_byte']:.4f})",
             f"  same bytes: gzip -9 {result['gzip_bits_per_byte']:.4f}, xz -9e "
             f"{result['xz_bits_per_byte']:.4f} bits per byte"]
    if result["expert_load"]:
        lines.append("expert usage:")
        lines.append(expert_usage_table(result["expert_load"], cfg.model.num_dense_layers))
    if result.get("plots"):
        lines.append("plots: " + ", ".join(result["plots"].values()))
    for s in result["samples"]:
        lines.append(f"--- sample (temperature {s['temperature']}, top_p {s['top_p']}) ---")
        lines.append(s["prompt"] + s["text"])
    return "\n".join(lines)
