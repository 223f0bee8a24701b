"""DeepSeek-V3 tensor names: HuggingFace / released checkpoint <-> moejax variable paths.

Accepted on import (spec section 3.2), all under `model.layers.{l}.` for layer l:
  * HF in-memory names: fused experts `mlp.experts.gate_up_proj [E, 2F, D]` (gate rows
    first) and `mlp.experts.down_proj [E, D, F]`;
  * `save_pretrained` / released-checkpoint names: one tensor per expert,
    `mlp.experts.{e}.{gate,up,down}_proj.weight`, FP8 weights with `weight_scale_inv`;
  * the MTP module at layer index num_hidden_layers (`enorm`, `hnorm`, `eh_proj`,
    `shared_head.norm`, a full MoE layer; its `embed_tokens` / `shared_head.head` copies
    duplicate the main model's and are skipped).
Torch weights are [out, in]; moejax kernels are [in, out] (split per head where useful).

A `Write` says where one piece of a HF tensor goes: variable path (collection first),
leading index (stacked layer, expert) and the array in moejax layout. Export yields the
`save_pretrained` names (unfused experts), which `from_pretrained` loads.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from moejax.config import ModelConfig

Path = tuple[str, ...]


class Write(NamedTuple):
    path: Path  # ("params", "moe_stack", "layers", "moe", "gate"), collection first
    index: tuple[int, ...]  # leading index into the target array (layer, expert)
    value: np.ndarray


Rule = Callable[[np.ndarray, ModelConfig], list[tuple[Path, np.ndarray]]]
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
MTP_DUPLICATES = ("embed_tokens.weight", "shared_head.head.weight")


def _linear(*rel: str) -> Rule:
    return lambda w, m: [(rel, w.T)]


def _vector(*rel: str) -> Rule:
    return lambda w, m: [(rel, w)]


def _per_head(*rel: str) -> Rule:
    """[H*K, in] -> [in, H, K]."""
    return lambda w, m: [(rel, w.T.reshape(w.shape[1], m.num_heads, -1))]


def _kv_a(w: np.ndarray, m: ModelConfig) -> list[tuple[Path, np.ndarray]]:
    c = m.mla.kv_lora_rank  # rows [0, C) latent, [C, C+R) the shared rope key
    return [(("attention", "kv_down"), w[:c].T), (("attention", "k_rope"), w[c:].T)]


def _kv_b(w: np.ndarray, m: ModelConfig) -> list[tuple[Path, np.ndarray]]:
    k = m.mla.qk_nope_head_dim  # per head: K key rows then J value rows
    per_head = w.reshape(m.num_heads, -1, w.shape[1])  # [H, K+J, C]
    return [(("attention", "k_up"), per_head[:, :k].transpose(2, 0, 1)),
            (("attention", "v_up"), per_head[:, k:].transpose(2, 0, 1))]


def _gate_up(w: np.ndarray, m: ModelConfig) -> list[tuple[Path, np.ndarray]]:
    f = w.shape[1] // 2
    return [(("moe", "gate"), w[:, :f].transpose(0, 2, 1)),
            (("moe", "up"), w[:, f:].transpose(0, 2, 1))]


LAYER_RULES: dict[str, Rule] = {
    "self_attn.q_a_proj.weight": _linear("attention", "q_down"),
    "self_attn.q_a_layernorm.weight": _vector("attention", "q_norm", "scale"),
    "self_attn.q_b_proj.weight": _per_head("attention", "q_up"),
    "self_attn.q_proj.weight": _per_head("attention", "query"),
    "self_attn.kv_a_proj_with_mqa.weight": _kv_a,
    "self_attn.kv_a_layernorm.weight": _vector("attention", "kv_norm", "scale"),
    "self_attn.kv_b_proj.weight": _kv_b,
    "self_attn.o_proj.weight": lambda w, m: [(("attention", "out"),
                                             w.T.reshape(m.num_heads, -1, w.shape[0]))],
    "input_layernorm.weight": _vector("attention_norm", "scale"),
    "post_attention_layernorm.weight": _vector("ffn_norm", "scale"),
}
DENSE_RULES: dict[str, Rule] = {
    "mlp.gate_proj.weight": _linear("mlp", "gate"),
    "mlp.up_proj.weight": _linear("mlp", "up"),
    "mlp.down_proj.weight": _linear("mlp", "down"),
}
MOE_RULES: dict[str, Rule] = {
    "mlp.gate.weight": _linear("moe", "router", "kernel"),
    "mlp.experts.gate_up_proj": _gate_up,
    "mlp.experts.down_proj": lambda w, m: [(("moe", "down"), w.transpose(0, 2, 1))],
    "mlp.shared_experts.gate_proj.weight": _linear("moe", "shared", "gate"),
    "mlp.shared_experts.up_proj.weight": _linear("moe", "shared", "up"),
    "mlp.shared_experts.down_proj.weight": _linear("moe", "shared", "down"),
}
MTP_RULES: dict[str, Rule] = {
    "enorm.weight": _vector("enorm", "scale"),
    "hnorm.weight": _vector("hnorm", "scale"),
    "eh_proj.weight": _linear("eh_proj"),
    "shared_head.norm.weight": _vector("norm", "scale"),
}
TOP_RULES: dict[str, Rule] = {
    "model.embed_tokens.weight": _vector("embed", "embedding"),
    "model.norm.weight": _vector("final_norm", "scale"),
    "lm_head.weight": _linear("head", "kernel"),
}


def layer_location(m: ModelConfig, layer: int) -> tuple[Path, tuple[int, ...], str]:
    """(params path of HF layer `layer`, its stacked index, kind "dense" | "moe" | "mtp")."""
    if layer == m.num_layers and m.mtp.depth:
        return ("params", "mtp", "block"), (), "mtp"
    if not 0 <= layer < m.num_layers:
        raise KeyError(f"layer {layer} does not exist (num_hidden_layers={m.num_layers}, "
                       f"MTP layers={m.mtp.depth}).")
    dense = layer < m.num_dense_layers
    stack, i = ("dense_stack", layer) if dense else ("moe_stack", layer - m.num_dense_layers)
    kind = "dense" if dense else "moe"
    if m.scan_layers:
        return ("params", stack, "layers"), (i,), kind
    return ("params", stack, f"layers_{i}"), (), kind


def _layer_writes(m: ModelConfig, layer: int, suffix: str, w: np.ndarray) -> list[Write]:
    root, index, kind = layer_location(m, layer)
    if suffix == "mlp.gate.e_score_correction_bias" and kind != "dense":
        path = ("moe_bias", "mtp_bias") if kind == "mtp" else ("moe_bias", "bias")
        row = 0 if kind == "mtp" else layer - m.num_dense_layers
        return [Write(path, (row,), w)]
    expert = _EXPERT.fullmatch(suffix)
    if expert and kind != "dense":
        e, which = int(expert.group(1)), expert.group(2)
        return [Write(root + ("moe", which), index + (e,), w.T)]
    rules = {**LAYER_RULES, **(DENSE_RULES if kind == "dense" else MOE_RULES)}
    if kind == "mtp":
        if suffix in MTP_RULES:
            return [Write(("params", "mtp") + rel, (), v) for rel, v in MTP_RULES[suffix](w, m)]
        if suffix in MTP_DUPLICATES:
            return []
    if suffix not in rules:
        raise KeyError(f"model.layers.{layer}.{suffix}")
    return [Write(root + rel, index, v) for rel, v in rules[suffix](w, m)]


def import_writes(name: str, w: np.ndarray, m: ModelConfig) -> list[Write]:
    """Where HF tensor `name` goes in the moejax variables; KeyError for unknown names."""
    if name in TOP_RULES:
        if name == "lm_head.weight" and m.tie_embeddings:
            return []
        return [Write(("params",) + rel, (), v) for rel, v in TOP_RULES[name](w, m)]
    match = _LAYER.fullmatch(name)
    if not match:
        raise KeyError(name)
    return _layer_writes(m, int(match.group(1)), match.group(2), w)


def _attention_tensors(a: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """The HF `self_attn.*` tensors of one MLA layer's parameters (numpy)."""
    if "q_down" in a:
        yield "self_attn.q_a_proj.weight", a["q_down"].T
        yield "self_attn.q_a_layernorm.weight", a["q_norm"]["scale"]
        yield "self_attn.q_b_proj.weight", a["q_up"].reshape(a["q_up"].shape[0], -1).T
    else:
        yield "self_attn.q_proj.weight", a["query"].reshape(a["query"].shape[0], -1).T
    kv_a = np.concatenate([a["kv_down"], a["k_rope"]], axis=1)
    yield "self_attn.kv_a_proj_with_mqa.weight", kv_a.T
    yield "self_attn.kv_a_layernorm.weight", a["kv_norm"]["scale"]
    kv_b = np.concatenate([a["k_up"], a["v_up"]], axis=2)  # [C, H, K+J]
    yield "self_attn.kv_b_proj.weight", kv_b.reshape(kv_b.shape[0], -1).T
    yield "self_attn.o_proj.weight", a["out"].reshape(-1, a["out"].shape[-1]).T


def layer_tensors(p: dict[str, Any], bias: np.ndarray | None
                  ) -> Iterator[tuple[str, np.ndarray]]:
    """HF suffixes and arrays of one decoder layer's parameters `p` (unfused experts)."""
    yield from _attention_tensors(p["attention"])
    yield "input_layernorm.weight", p["attention_norm"]["scale"]
    yield "post_attention_layernorm.weight", p["ffn_norm"]["scale"]
    if "mlp" in p:
        for which in ("gate", "up", "down"):
            yield f"mlp.{which}_proj.weight", p["mlp"][which].T
        return
    moe = p["moe"]
    yield "mlp.gate.weight", moe["router"]["kernel"].T
    yield "mlp.gate.e_score_correction_bias", bias
    for e in range(moe["gate"].shape[0]):
        for which in ("gate", "up", "down"):
            yield f"mlp.experts.{e}.{which}_proj.weight", moe[which][e].T
    if "shared" in moe:
        for which in ("gate", "up", "down"):
            yield f"mlp.shared_experts.{which}_proj.weight", moe["shared"][which].T
