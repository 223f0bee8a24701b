"""Parameter and FLOP counting for `moejax.plan` and the MFU metric, and the `Transformer`'s.

Counting works on abstract variables (`jax.eval_shape(model.init)`: shapes only), so a
trillion-parameter model counts on a laptop. `plan_transformer` counts a `Transformer`
from its shapes; `transformer_flops_per_token` is the same training FLOPs from the config
alone (tests/test_metrics.py checks they agree). DeepSeek-V4's plan is
`moejax.model.v4.plan`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import ModelConfig, model_config
from moejax.model.transformer import Transformer

NON_MATMUL = ("scale", "sinks", "position_bias", "base", "bias", "embedding")


def leaves_with_names(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    """(path of key names, leaf) of every leaf."""
    return [(tuple(str(getattr(p, "key", p)) for p in path), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def _is_matmul(path: tuple[str, ...], leaf: Any) -> bool:
    return path[-1] not in NON_MATMUL and len(leaf.shape) >= 2


def abstract_variables(model: nn.Module) -> Any:
    """The model's unboxed variables as shapes (jax.eval_shape: no memory used)."""
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))


def _routed(path: tuple[str, ...]) -> bool:
    """A routed-expert weight: moe/{gate,up,down} (not the shared expert's)."""
    return len(path) >= 2 and path[-2] == "moe" and path[-1] in ("gate", "up", "down")


def count_params(variables: Any, num_experts: int, top_k: int) -> dict[str, int]:
    """Counts over the params tree: `main` (MTP excluded), `mtp`, `active` (top_k of
    num_experts routed-expert weights per MoE layer), `active_matmul` (active, matmuls
    only: not norm scales, biases, sinks, embedding lookups)."""
    totals = {"main": 0, "mtp": 0, "active": 0, "active_matmul": 0}
    for path, leaf in leaves_with_names(variables["params"]):
        size = math.prod(leaf.shape)
        part = "mtp" if path[0] == "mtp" else "main"
        totals[part] += size
        if part == "mtp":
            continue
        used = size * top_k // num_experts if _routed(path) else size
        totals["active"] += used
        if _is_matmul(path, leaf):
            totals["active_matmul"] += used
    return totals


def plan_transformer(section: Any, seq_len: int) -> dict[str, float]:
    """`moejax.plan` figures of a `Transformer` model section (see that module)."""
    m = model_config(section)
    variables = abstract_variables(Transformer(m))
    counts = count_params(variables, m.moe.num_experts, m.moe.top_k)
    embedding = m.vocab_size * m.embed_dim
    active = counts["active"] - (0 if m.tie_embeddings else embedding)
    matmul = counts["active_matmul"] + (embedding if m.tie_embeddings else 0)
    if getattr(m, "attention_type", "gqa") == "mla":
        qk = m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim
        per_head = qk + m.mla.v_head_dim
    else:
        per_head = 2 * m.head_dim
    attn = 3 * 2 * m.num_layers * seq_len * m.num_heads * per_head
    biases = variables.get("moe_bias", {})  # HF e_score_correction_bias rows
    main_bias = math.prod(biases["bias"].shape) if "bias" in biases else 0
    mtp_bias = math.prod(biases["mtp_bias"].shape) if "mtp_bias" in biases else 0
    return {"total_params": counts["main"] + main_bias, "mtp_params": counts["mtp"] + mtp_bias,
            "active_params": active + main_bias, "embedding_params": embedding,
            "flops_per_token": float(6 * matmul + attn)}


def active_params_per_token(m: ModelConfig) -> dict[str, int]:
    """Matrix parameters a token passes through per layer kind (for FLOP estimates)."""
    attn = m.embed_dim * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
    if m.attention_type == "mla":  # q (low-rank or plain), kv down/up, out projections
        a, d, h = m.mla, m.embed_dim, m.num_heads
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        attn = (d * a.q_lora_rank + a.q_lora_rank * h * qk if a.q_lora_rank else d * h * qk)
        attn += d * (a.kv_lora_rank + a.qk_rope_head_dim) + h * a.v_head_dim * d
        attn += a.kv_lora_rank * h * (a.qk_nope_head_dim + a.v_head_dim)
    dense = 3 * m.embed_dim * m.mlp_hidden
    moe = 3 * m.embed_dim * m.moe.expert_hidden * (m.moe.top_k + m.moe.num_shared_experts)
    router = m.embed_dim * m.moe.num_experts
    return {"attention": attn, "dense_ffn": dense, "moe_ffn": moe + router,
            "head": m.embed_dim * m.vocab_size}


def transformer_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N_active + 12 * num_layers * seq_len * H * K.

    N_active counts the matmul weights one token passes through (attention projections of
    every layer, the dense FFNs, the top_k routed + shared experts and the router of every
    MoE layer, and the LM head; the embedding lookup is not a matmul). Each weight costs 2
    FLOPs forward and 4 backward, hence 6. The attention term is the score and value
    matmuls, QK^T and AV, 2 * 2 * seq_len * H * K per token and layer forward, times 3 with
    the backward pass; causal masking is not discounted (the PaLM convention). For MLA the
    two K are the query/key dims (qk_nope + qk_rope) and the value dims (v_head_dim), as
    in `moejax.plan` (model.head_dim is unused by MLA).
    """
    per_layer = active_params_per_token(m)
    n_active = (m.num_layers * per_layer["attention"]
                + m.num_dense_layers * per_layer["dense_ffn"]
                + m.num_moe_layers * per_layer["moe_ffn"]
                + per_layer["head"])
    if getattr(m, "attention_type", "gqa") == "mla":  # QK^T over nope + rope dims, AV over v
        per_head = m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim + m.mla.v_head_dim
    else:
        per_head = 2 * m.head_dim
    attention = 6 * m.num_layers * seq_len * m.num_heads * per_head
    return float(6 * n_active + attention)
