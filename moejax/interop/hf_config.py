"""HuggingFace `DeepseekV3Config` (config.json) <-> moejax `ModelConfig`.

Both the transformers-5 form (`rope_parameters`) and the released form (`rope_theta` +
legacy `rope_scaling` with `type`) are read. Fields HF ignores for V3 (`topk_method`,
`num_key_value_heads`) are ignored; anything whose HF meaning moejax cannot reproduce
(another model type, activation, scoring function, attention bias, explicit YaRN
`attention_factor`, more than one MTP module) is a ValueError naming the field.
"""
from __future__ import annotations

from typing import Any

from moejax.config import (MLAConfig, ModelConfig, MoEConfig, MTPConfig, RopeConfig,
                           validate_model)

MODEL_TYPE = "deepseek_v3"


def _require(ok: bool, field: str, value: Any, why: str) -> None:
    if not ok:
        raise ValueError(f"config.json: {field}={value!r} is not supported: {why}")


def rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """The RoPE dict in transformers-5 form, from `rope_parameters` or legacy keys."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return params


def _rope(hf: dict[str, Any]) -> RopeConfig:
    p = rope_parameters(hf)
    style = "interleaved" if hf.get("rope_interleave", True) else "half"
    kind = p["rope_type"]
    _require(kind in ("default", "yarn"), "rope_parameters.rope_type", kind,
             "moejax implements 'default' and 'yarn'.")
    if kind == "default":
        return RopeConfig(theta=float(p["rope_theta"]), style=style)
    _require(p.get("attention_factor") is None, "rope_parameters.attention_factor",
             p.get("attention_factor"), "moejax derives it from mscale / mscale_all_dim.")
    _require(p.get("truncate", True), "rope_parameters.truncate", p.get("truncate"),
             "only the truncated YaRN correction range is implemented.")
    original = int(p["original_max_position_embeddings"])
    factor = p.get("factor") or hf["max_position_embeddings"] / original
    return RopeConfig(
        theta=float(p["rope_theta"]), style=style, yarn_factor=float(factor),
        yarn_original_max_len=original, yarn_beta_fast=float(p.get("beta_fast") or 32),
        yarn_beta_slow=float(p.get("beta_slow") or 1),
        yarn_mscale=float(p.get("mscale") or 0.0),
        yarn_mscale_all_dim=float(p.get("mscale_all_dim") or 0.0))


REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
            "max_position_embeddings")


def _check_supported(hf: dict[str, Any], mtp_depth: int) -> None:
    _require(hf.get("model_type") == MODEL_TYPE, "model_type", hf.get("model_type"),
             f"moejax.interop.hf reads '{MODEL_TYPE}' checkpoints only.")
    missing = [k for k in REQUIRED if hf.get(k) is None]
    if missing:
        raise ValueError(f"config.json lacks required DeepSeek-V3 field(s) {missing}.")
    _require(hf.get("hidden_act", "silu") == "silu", "hidden_act", hf.get("hidden_act"),
             "moejax's FFNs are SwiGLU (silu).")
    _require(hf.get("scoring_func", "sigmoid") == "sigmoid", "scoring_func",
             hf.get("scoring_func"), "HF DeepSeek-V3 always scores with sigmoid.")
    _require(not hf.get("attention_bias", False), "attention_bias", hf.get("attention_bias"),
             "moejax's projections have no bias.")
    _require(mtp_depth <= 1, "num_nextn_predict_layers", mtp_depth,
             "moejax implements MTP depth 0 or 1.")


def model_from_hf(hf: dict[str, Any], mtp_depth: int, param_dtype: str = "float32"
                  ) -> ModelConfig:
    """The moejax model of a HF DeepSeek-V3 config (dropless MoE, fp32 compute)."""
    _check_supported(hf, mtp_depth)
    heads = hf["num_attention_heads"]
    n_group = hf.get("n_group") or 1
    mla = MLAConfig(q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
                    qk_nope_head_dim=hf["qk_nope_head_dim"],
                    qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"])
    moe = MoEConfig(
        num_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"],
        expert_hidden=hf["moe_intermediate_size"],
        num_shared_experts=hf.get("n_shared_experts") or 0, score_fn="sigmoid",
        renormalize=bool(hf.get("norm_topk_prob", True)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        num_groups=n_group, top_groups=hf.get("topk_group") or n_group,
        capacity_factor=0.0, dispatch="index")
    model = ModelConfig(
        vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_dense_layers=min(hf.get("first_k_dense_replace") or 0, hf["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=heads,
        head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim,
        mlp_hidden=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)), dtype="float32",
        param_dtype=param_dtype, attention_type="mla", rope=_rope(hf), moe=moe, mla=mla,
        mtp=MTPConfig(depth=mtp_depth))
    validate_model(model)
    return model


def _rope_to_hf(r: RopeConfig) -> dict[str, Any]:
    if r.yarn_factor <= 1.0:
        return {"rope_type": "default", "rope_theta": r.theta}
    return {"rope_type": "yarn", "rope_theta": r.theta, "factor": r.yarn_factor,
            "original_max_position_embeddings": r.yarn_original_max_len,
            "beta_fast": r.yarn_beta_fast, "beta_slow": r.yarn_beta_slow,
            "mscale": r.yarn_mscale, "mscale_all_dim": r.yarn_mscale_all_dim}


def hf_from_model(m: ModelConfig, dtype: str) -> dict[str, Any]:
    """config.json of a moejax MLA model, as `DeepseekV3Config.from_pretrained` reads it."""
    def need(ok: bool, field: str, value: Any, why: str) -> None:
        if not ok:
            raise ValueError(f"cannot export {field}={value!r} as DeepSeek-V3: {why}")
    need(m.attention_type == "mla", "model.attention_type", m.attention_type,
         "HF DeepSeek-V3 uses multi-head latent attention.")
    need(m.moe.score_fn == "sigmoid", "model.moe.score_fn", m.moe.score_fn,
         "HF DeepSeek-V3 always scores with sigmoid.")
    need(m.num_moe_layers > 0, "model.num_dense_layers", m.num_dense_layers,
         "HF DeepSeek-V3 needs at least one MoE layer.")
    a, e = m.mla, m.moe
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": MODEL_TYPE,
        "vocab_size": m.vocab_size, "hidden_size": m.embed_dim,
        "intermediate_size": m.mlp_hidden, "moe_intermediate_size": e.expert_hidden,
        "num_hidden_layers": m.num_layers, "first_k_dense_replace": m.num_dense_layers,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_heads,
        "q_lora_rank": a.q_lora_rank or None, "kv_lora_rank": a.kv_lora_rank,
        "qk_nope_head_dim": a.qk_nope_head_dim, "qk_rope_head_dim": a.qk_rope_head_dim,
        "v_head_dim": a.v_head_dim, "n_routed_experts": e.num_experts,
        "n_shared_experts": e.num_shared_experts, "num_experts_per_tok": e.top_k,
        "n_group": e.num_groups, "topk_group": e.top_groups,
        "routed_scaling_factor": e.routed_scaling_factor, "norm_topk_prob": e.renormalize,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
        "initializer_range": m.init_std, "tie_word_embeddings": m.tie_embeddings,
        "rope_interleave": m.rope.style == "interleaved", "rope_parameters": _rope_to_hf(m.rope),
        "attention_bias": False, "attention_dropout": 0.0,
        "num_nextn_predict_layers": m.mtp.depth, "bos_token_id": 0, "eos_token_id": 1,
        "dtype": dtype,
    }
