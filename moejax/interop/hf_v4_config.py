"""DeepSeek-V4 HuggingFace config (a `DeepseekV4Config` or its config.json) <-> V4Config.

`v4_config_from_hf` accepts the modern keys (`layer_types`, `compress_rates`, `mlp_layer_types`,
`partial_rotary_factor`, nested `rope_parameters`) and the legacy ones of the published
config.json (`compress_ratios`, `num_hash_layers`, `qk_rope_head_dim`, `rope_scaling`,
`compress_rate_csa` / `compress_rate_hca`), as HF's `DeepseekV4Config.__post_init__` does.
Hash layers must come first (`num_hash_layers`); HF always builds one shared expert.

`hf_from_v4` writes the modern keys (what `save_pretrained` writes), plus `qk_rope_head_dim`.
HF always clamps the SwiGLU, so moejax's "no clamp" (`swiglu_limit = 0`) is written as the
largest float32 (`NO_CLAMP`, a clamp that never bites) and read back as 0. Training-only
fields (dispatch, capacity, balance / z-loss / indexer-loss coefficients, dtypes, scanning)
have no HF counterpart and come back as the importer's defaults.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from moejax.config.v4 import (HyperConfig, V4AttentionConfig, V4Config, V4MoEConfig,
                                    V4MTPConfig, layer_types_from_ratios, validate_v4)

MODEL_TYPE = "deepseek_v4"
HF_LAYER_TYPES = {"sliding_attention": "sliding", "compressed_sparse_attention": "csa",
                  "heavily_compressed_attention": "hca"}
V4_LAYER_TYPES = {v: k for k, v in HF_LAYER_TYPES.items()}
NO_CLAMP = float(np.finfo(np.float32).max)  # HF's swiglu_limit for moejax's 0 (no clamp)


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


def _swiglu_limit(hf: Any) -> float:
    limit = float(_get(hf, "swiglu_limit"))
    return 0.0 if limit >= NO_CLAMP else limit


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
        num_hash_layers=_num_hash(hf, n), swiglu_limit=_swiglu_limit(hf),
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


def _rope_parameters(a: V4AttentionConfig) -> dict[str, Any]:
    """HF's nested {"main", "compress"} RoPE dict of the two moejax tables."""
    partial = a.rope_head_dim / a.head_dim
    main = {"rope_type": "default", "rope_theta": a.rope_theta,
            "partial_rotary_factor": partial}
    compress = {"rope_type": "default", "rope_theta": a.compress_rope_theta,
                "partial_rotary_factor": partial}
    if a.yarn_factor > 1.0:
        compress.update(rope_type="yarn", factor=a.yarn_factor, attention_factor=1.0,
                        original_max_position_embeddings=a.yarn_original_max_len,
                        beta_fast=a.yarn_beta_fast, beta_slow=a.yarn_beta_slow)
    return {"main": main, "compress": compress}


def _check_exportable(c: V4Config) -> None:
    def need(ok: bool, field: str, value: Any, why: str) -> None:
        if not ok:
            raise ValueError(f"cannot export model.{field}={value!r} as DeepSeek-V4: {why}")
    need(c.moe.num_shared_experts == 1, "moe.num_shared_experts", c.moe.num_shared_experts,
         "HF always builds exactly one shared expert of width moe_intermediate_size.")
    need(c.moe.score_fn != "softmax", "moe.score_fn", c.moe.score_fn,
         "HF DeepSeek-V4 cannot score with softmax (KeyError in ACT2FN).")
    need(c.mtp.depth == 0 or c.mtp.layer_type == "sliding", "mtp.layer_type",
         c.mtp.layer_type, "the exported MTP block (DeepSeek's `mtp.0.*`) is read back as a "
         "sliding-window layer; HF's config has no field for its type.")


def hf_from_v4(c: V4Config, dtype: str = "float32") -> dict[str, Any]:
    """config.json of a moejax V4 model, as `DeepseekV4Config.from_pretrained` reads it.

    Raises ValueError for a model HF cannot represent (see `_check_exportable`).
    """
    _check_exportable(c)
    a, e = c.attention, c.moe
    yarn_len = a.yarn_factor * a.yarn_original_max_len if a.yarn_factor > 1.0 else 0
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": MODEL_TYPE,
        "vocab_size": c.vocab_size, "hidden_size": c.embed_dim,
        "num_hidden_layers": c.num_layers, "num_attention_heads": a.num_heads,
        "num_key_value_heads": 1, "head_dim": a.head_dim,
        "partial_rotary_factor": a.rope_head_dim / a.head_dim,
        "qk_rope_head_dim": a.rope_head_dim, "q_lora_rank": a.q_lora_rank,
        "o_groups": a.o_groups, "o_lora_rank": a.o_lora_rank,
        "sliding_window": a.sliding_window,
        "layer_types": [V4_LAYER_TYPES[t] for t in a.layer_types],
        "compress_rates": {"compressed_sparse_attention": a.csa_rate,
                           "heavily_compressed_attention": a.hca_rate},
        "index_n_heads": a.index_heads, "index_head_dim": a.index_head_dim,
        "index_topk": a.index_topk, "rope_theta": a.rope_theta,
        "compress_rope_theta": a.compress_rope_theta, "rope_parameters": _rope_parameters(a),
        "max_position_embeddings": int(max(c.max_seq_len, yarn_len)),
        "n_routed_experts": e.num_experts, "num_experts_per_tok": e.top_k,
        "moe_intermediate_size": e.expert_hidden, "n_shared_experts": 1,
        "scoring_func": e.score_fn, "norm_topk_prob": True,
        "routed_scaling_factor": e.routed_scaling_factor,
        "mlp_layer_types": ["hash_moe" if c.is_hash(i) else "moe"
                            for i in range(c.num_layers)],
        "swiglu_limit": e.swiglu_limit if e.swiglu_limit > 0 else NO_CLAMP,
        "hc_mult": c.hc.hc_mult, "hc_sinkhorn_iters": c.hc.sinkhorn_iters, "hc_eps": c.hc.eps,
        "rms_norm_eps": c.norm_eps, "initializer_range": c.init_std, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "num_nextn_predict_layers": c.mtp.depth,
        "bos_token_id": 0, "eos_token_id": 1, "dtype": dtype,
    }
