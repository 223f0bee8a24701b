"""DeepSeek-V4 HuggingFace config (a `DeepseekV4Config` or its config.json) -> V4Config.

Accepts the modern keys (`layer_types`, `compress_rates`, `mlp_layer_types`,
`partial_rotary_factor`, nested `rope_parameters`) and the legacy ones of the published
config.json (`compress_ratios`, `num_hash_layers`, `qk_rope_head_dim`, `rope_scaling`,
`compress_rate_csa` / `compress_rate_hca`), as HF's `DeepseekV4Config.__post_init__` does.
Hash layers must come first (`num_hash_layers`); HF always builds one shared expert.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from moejax.model.v4_config import (HyperConfig, V4AttentionConfig, V4Config, V4MoEConfig,
                                    V4MTPConfig, layer_types_from_ratios, validate_v4)

HF_LAYER_TYPES = {"sliding_attention": "sliding", "compressed_sparse_attention": "csa",
                  "heavily_compressed_attention": "hca"}


def _get(hf: Any, key: str, default: Any = None) -> Any:
    return hf.get(key, default) if isinstance(hf, Mapping) else getattr(hf, key, default)


def _layer_types(hf: Any, n: int) -> tuple[str, ...]:
    types = _get(hf, "layer_types")
    if types is not None:
        return tuple(HF_LAYER_TYPES[t] for t in types[:n])
    ratios = _get(hf, "compress_ratios")
    if ratios is None:
        raise ValueError("the HF config has neither layer_types nor compress_ratios.")
    return layer_types_from_ratios(ratios, n)


def _num_hash(hf: Any, n: int) -> int:
    kinds = _get(hf, "mlp_layer_types")
    if kinds is None:
        return min(n, _get(hf, "num_hash_layers", 3))
    count = sum(k == "hash_moe" for k in kinds[:n])
    if list(kinds[:count]) != ["hash_moe"] * count:
        raise ValueError(f"mlp_layer_types={kinds}: hash layers must come first.")
    return count


def v4_config_from_hf(hf: Any, max_seq_len: int = 4096, **overrides: Any) -> V4Config:
    """V4Config from a `DeepseekV4Config` or its config.json dict (legacy keys accepted)."""
    n = _get(hf, "num_hidden_layers")
    head_dim = _get(hf, "head_dim")
    rope_dim = _get(hf, "qk_rope_head_dim") or int(head_dim * _get(hf, "partial_rotary_factor"))
    rope = _get(hf, "rope_parameters") or {}
    compress = rope.get("compress") if isinstance(rope.get("compress"), dict) else (
        _get(hf, "rope_scaling") or rope)
    rates = dict(_get(hf, "compress_rates") or {})
    yarn = compress.get("rope_type", compress.get("type")) == "yarn"
    attention = V4AttentionConfig(
        num_heads=_get(hf, "num_attention_heads"), head_dim=head_dim, rope_head_dim=rope_dim,
        q_lora_rank=_get(hf, "q_lora_rank"), o_groups=_get(hf, "o_groups"),
        o_lora_rank=_get(hf, "o_lora_rank"), sliding_window=_get(hf, "sliding_window"),
        layer_types=_layer_types(hf, n),
        csa_rate=rates.get("compressed_sparse_attention", _get(hf, "compress_rate_csa", 4)),
        hca_rate=rates.get("heavily_compressed_attention", _get(hf, "compress_rate_hca", 128)),
        index_heads=_get(hf, "index_n_heads"), index_head_dim=_get(hf, "index_head_dim"),
        index_topk=_get(hf, "index_topk"), rope_theta=float(_get(hf, "rope_theta")),
        compress_rope_theta=float(_get(hf, "compress_rope_theta")),
        yarn_factor=float(compress.get("factor", 1.0)) if yarn else 1.0,
        yarn_original_max_len=int(compress.get("original_max_position_embeddings", 65536)),
        yarn_beta_fast=float(compress.get("beta_fast", 32)),
        yarn_beta_slow=float(compress.get("beta_slow", 1)))
    moe = V4MoEConfig(
        num_experts=_get(hf, "n_routed_experts"), top_k=_get(hf, "num_experts_per_tok"),
        expert_hidden=_get(hf, "moe_intermediate_size"), num_shared_experts=1,
        score_fn=_get(hf, "scoring_func"),
        routed_scaling_factor=float(_get(hf, "routed_scaling_factor")),
        num_hash_layers=_num_hash(hf, n), swiglu_limit=float(_get(hf, "swiglu_limit")),
        dispatch="dense", capacity_factor=0.0)
    cfg = V4Config(
        vocab_size=_get(hf, "vocab_size"), embed_dim=_get(hf, "hidden_size"), num_layers=n,
        max_seq_len=max_seq_len, norm_eps=float(_get(hf, "rms_norm_eps")),
        init_std=float(_get(hf, "initializer_range", 0.02)), attention=attention, moe=moe,
        hc=HyperConfig(_get(hf, "hc_mult"), _get(hf, "hc_sinkhorn_iters"),
                       float(_get(hf, "hc_eps"))),
        mtp=V4MTPConfig(depth=min(1, _get(hf, "num_nextn_predict_layers", 0) or 0)))
    cfg = dataclasses.replace(cfg, **overrides)
    validate_v4(cfg)
    return cfg
