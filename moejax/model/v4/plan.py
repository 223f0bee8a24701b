"""`moejax.plan` figures of a DeepSeek-V4 model: parameters counted from the shapes, FLOPs.

total_params counts the balance-bias rows of the learned-routing layers only (hash layers
have none in the checkpoint) and not the frozen tid2eid tables, so it equals the published
totals. flops_per_token = 6 * active matmul weights + attention, where each layer's keys are
min(W, seq_len) window keys plus seq_len / m' entries (HCA) or min(k_I, seq_len / m)
entries (CSA), and a CSA layer adds its indexer's forward scores 2 * H_I * d_I * seq_len / m
(no backward: the top-k selection blocks the gradient).
"""
from __future__ import annotations

from typing import Any

from moejax.config.v4 import v4_config
from moejax.model.counting import abstract_variables, count_params
from moejax.model.v4.model import TransformerV4


def plan_v4(section: Any, seq_len: int) -> dict[str, float]:
    """`moejax.plan` figures of a DeepSeek-V4 model section (see the module docstring)."""
    cfg = v4_config(section)
    e, a = cfg.moe, cfg.attention
    variables = abstract_variables(TransformerV4(cfg))
    counts = count_params(variables, e.num_experts, e.top_k)
    biases = (cfg.num_layers - e.num_hash_layers) * e.num_experts
    embedding = cfg.vocab_size * cfg.embed_dim
    window = min(a.sliding_window, seq_len)
    attn = 0.0
    for kind in a.layer_types:
        keys = window
        if kind == "hca":
            keys += seq_len // a.hca_rate
        elif kind == "csa":
            keys += min(a.index_topk, seq_len // a.csa_rate)
            attn += 2 * a.index_heads * a.index_head_dim * (seq_len // a.csa_rate)
        attn += 3 * 2 * 2 * a.num_heads * a.head_dim * keys
    return {
        "total_params": counts["main"] + biases,
        "mtp_params": counts["mtp"] + (e.num_experts if cfg.mtp.depth else 0),
        "active_params": counts["active"] + biases - embedding,
        "embedding_params": embedding,
        "flops_per_token": float(6 * (counts["active_matmul"]) + attn),
    }
