"""Held-out metrics: cross-entropy, perplexity, bits per byte and expert usage per layer.

bits_per_byte = (sum of target NLL in nats) / ln 2 / (UTF-8 bytes of those targets), so it
does not depend on the tokenizer. The byte-unigram baseline (`unigram_bits_per_byte`,
add-one smoothed byte frequencies of the train split) is computed on exactly the bytes
that were evaluated: a model whose bits per byte is not clearly below it has learnt
nothing beyond byte frequencies.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from moejax import data as moedata
from moejax.config import Config
from moejax.distributed import BatchLayout, allgather_json, sum_over_processes
from moejax.model.build import architecture_of
from moejax.train.loss import batch_loss, target_mask
from moejax.train.state import TrainSetup, TrainState
from moejax.train.step import batch_sharding

Batch = dict[str, jax.Array]
BASELINE_TRAIN_DOCUMENTS = 2000  # documents of the train split fitted by the unigram model


def make_heldout_step(setup: TrainSetup, batch_size: int, seq_len: int
                      ) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """Jitted (state, batch) -> the batch's `loss.batch_loss` statistics: summed target
    NLL `nll` (nats), target count `count`, and the MoE statistics (`expert_load`, ...)."""
    extra = architecture_of(setup.model.cfg).extra_losses

    def step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        logits, aux = setup.model.apply(state.variables(), batch["tokens"],
                                        batch["segment_ids"], batch["positions"])
        return batch_loss(logits, aux, batch, weight_mtp=0.0, extra_losses=extra)[1]

    return jax.jit(step, in_shardings=(setup.shardings,
                                       batch_sharding(setup.mesh, batch_size, seq_len)),
                   out_shardings=NamedSharding(setup.mesh, PartitionSpec()))


class HeldOut:
    """Evaluates a state on the first `num_batches` batches of the validation split.

    with_details adds `expert_load`, `evaluated_texts` (each row's targets decoded) and
    `evaluated_bytes`: exactly the bytes the bits/byte denominator counts (every row's
    target bytes, `moedata.token_bytes`, concatenated in (batch, row) order).
    """

    def __init__(self, setup: TrainSetup, cfg: Config, tokenizer: moedata.Tokenizer,
                 num_batches: int):
        self.cfg, self.tokenizer, self.num_batches = cfg, tokenizer, num_batches
        t = cfg.train
        self.sharding = batch_sharding(setup.mesh, t.batch_size, t.seq_len)
        self.layout = BatchLayout(self.sharding, t.batch_size, t.seq_len)
        self.step = make_heldout_step(setup, t.batch_size, t.seq_len)

    def batches(self) -> Any:
        t = self.cfg.train
        it = moedata.make_eval_iterator(self.cfg.data, self.tokenizer, t.seq_len, t.batch_size,
                                        rows=self.layout.rows)
        return itertools.islice(it, self.num_batches)

    def owned_targets(self, host_batch: Mapping[str, np.ndarray]) -> Any:
        """(global row, target ids) of the rows this process counts (each row once per job)."""
        mask = np.asarray(target_mask(host_batch["segment_ids"]))
        tokens = np.asarray(host_batch["tokens"])[:, 1:]
        for i in np.flatnonzero(self.layout.owned):
            yield int(self.layout.rows[i]), tokens[i][mask[i]]

    def __call__(self, state: TrainState, with_details: bool = False) -> dict[str, Any]:
        """`validation/*` metrics; with_details adds per-layer expert load and the texts.

        Bytes and texts are counted per row by the row's owning process and combined over
        processes, so the result does not depend on the number of processes.
        """
        nll = count = 0.0
        num_bytes, loads, texts = 0, [], []
        for b, host in enumerate(self.batches()):
            out = jax.device_get(self.step(state, self.layout.to_global(host)))
            nll, count = nll + float(out["nll"]), count + float(out["count"])
            for row, targets in self.owned_targets(host):
                raw = moedata.token_bytes(self.tokenizer, targets)
                num_bytes += len(raw)
                if with_details:  # the bytes travel as latin-1 text (JSON-safe, 1:1)
                    texts.append((b, row, self.tokenizer.decode(targets), raw.decode("latin-1")))
            if "expert_load" in out:
                loads.append(np.asarray(out["expert_load"]))
        if count == 0:
            return {}
        num_bytes = sum_over_processes(num_bytes)
        ce = nll / count
        metrics: dict[str, Any] = {
            "validation/cross_entropy": ce,
            "validation/perplexity": math.exp(min(ce, 80.0)),
            "validation/bits_per_byte": nll / math.log(2) / max(num_bytes, 1)}
        if with_details:
            metrics["expert_load"] = np.mean(loads, axis=0).tolist() if loads else []
            every = sorted(tuple(t) for part in allgather_json(texts) for t in part)
            metrics["evaluated_texts"] = [text for _, _, text, _ in every]
            metrics["evaluated_bytes"] = "".join(raw for *_, raw in every).encode("latin-1")
        return metrics


def unigram_baseline(cfg: Config, evaluated_texts: list[str]) -> float:
    """Byte-unigram bits per byte on the evaluated texts, fitted on the train split."""
    source = moedata.make_source(cfg.data, "train")
    limit = min(len(source), BASELINE_TRAIN_DOCUMENTS)
    train_texts = (source[i] for i in range(limit))
    return moedata.unigram_bits_per_byte(train_texts, evaluated_texts)


def expert_usage_table(load: list[list[float]], first_moe_layer: int) -> str:
    """One line per MoE layer: max/mean load and the share of the busiest expert."""
    lines = []
    for i, row in enumerate(load):
        arr = np.asarray(row)
        lines.append(f"  layer {first_moe_layer + i}: max/mean {arr.max() / arr.mean():.2f}, "
                     f"min share {arr.min():.3f}, max share {arr.max():.3f}")
    return "\n".join(lines)


__all__ = ["HeldOut", "make_heldout_step", "unigram_baseline", "expert_usage_table"]
