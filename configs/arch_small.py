"""DeepSeek-V3-shaped and DeepSeek-V4-shaped small models for bench/arch_efficiency.py.

    moejax.load_config("configs/arch_small.py:v3")   MLA, sigmoid routing, AdamW
    moejax.load_config("configs/arch_small.py:v4")   hybrid CSA/HCA attention, mHC, hash
                                                     layers, sqrtsoftplus routing, Muon
    python -m moejax.plan --config configs/arch_small.py:v4

Both share what the comparison holds fixed: width D = 128, depth 4, 8 routed experts of
width 96 + 1 shared, top-2, byte tokenizer, the built-in corpus, 16 x 256 tokens per step,
the same learning-rate schedule (warmup 30, cosine to 0.1x), peak learning rate 2e-3
(configs/tiny.py's, tuned for AdamW at this size; Muon's updates are rescaled to AdamW's
RMS, moejax/train/muon.py, so the same peak serves both), weight decay 0.1, gradient
clipping 1.0, the aux-loss-free balancing rate 1e-3 and balance-loss weight 1e-4 of both
papers, dropless dispatch. MTP is off in both (both papers train one MTP module; it is
not what differs, and `moejax.plan`'s FLOPs do not count it).

What differs is each architecture's own, from its paper (docs/deepseek_v3_v4.md):

* v3: first layer dense (first_k_dense_replace), MLA (q latent 96, kv latent 64, 4 heads of
  32 + 16 rotary dims, values 32), sigmoid scoring, group-limited routing (4 groups, 2
  kept), routed scaling 2.5, AdamW (b1 0.9, b2 0.95).
* v4: every layer MoE, the first two routed by a frozen token hash; shared-KV attention
  (4 heads of 64, 16 rotary, q latent 96, grouped output 2 x 64) with a sliding window of
  32 plus compressed entries: layers sliding, CSA (stride 4, top-16 of the 64 entries,
  lightning indexer 8 x 32 trained by its KL loss), HCA (every 16 tokens), CSA; mHC with 4
  residual streams; sqrtsoftplus scoring, routed scaling 1.5, SwiGLU clamp 10; Muon
  (Nesterov momentum 0.95, 5 Newton-Schulz steps) on matrices, AdamW on the rest.

Training FLOPs per token at seq_len 256 (`moejax.plan`): v3 7,044,096, v4 7,045,120. V3's
dense-layer width (436) is the integer that comes closest to v4's figure (within 0.015 %;
one unit of it is 6 * 3 * 128 = 2304 FLOPs). Parameters: v3 1.56M total (0.85M active),
v4 2.01M total (1.08M active): at equal FLOPs V4 holds more active weights, because its
attention over 32 window keys + compressed entries costs less than MLA over all 256 keys.
"""
from __future__ import annotations

import pathlib

import ml_collections

from moejax.config import load_config_file

WIDTH, DEPTH, EXPERTS, TOP_K, EXPERT_HIDDEN = 128, 4, 8, 2, 96
SEQ_LEN = 256
V3_DENSE_HIDDEN = 436  # matches v4's training FLOPs per token (module docstring)


def _v3_model() -> ml_collections.ConfigDict:
    cfg = load_config_file(str(pathlib.Path(__file__).with_name("deepseek_v3.py")) + ":tiny")
    m = cfg.model
    m.embed_dim, m.num_layers, m.num_dense_layers = WIDTH, DEPTH, 1
    m.num_heads = m.num_kv_heads = 4
    m.head_dim = 48  # unused by MLA (qk_nope + qk_rope)
    m.mlp_hidden = V3_DENSE_HIDDEN
    m.max_seq_len = 1024
    m.mla.q_lora_rank, m.mla.kv_lora_rank = 96, 64
    m.mla.qk_nope_head_dim, m.mla.qk_rope_head_dim, m.mla.v_head_dim = 32, 16, 32
    m.rope.yarn_factor = 1.0  # no context extension at 256 tokens
    m.rope.yarn_mscale_all_dim = 0.0
    e = m.moe
    e.num_experts, e.top_k, e.expert_hidden = EXPERTS, TOP_K, EXPERT_HIDDEN
    e.dispatch, e.capacity_factor = "dropless", 0.0
    e.bias_update_rate, e.balance_loss_coef = 1e-3, 1e-4
    m.mtp.depth = 0
    return m


def _v4_model() -> ml_collections.ConfigDict:
    cfg = load_config_file(str(pathlib.Path(__file__).with_name("deepseek_v4.py")) + ":tiny")
    m = cfg.model
    m.embed_dim, m.num_layers = WIDTH, DEPTH
    m.max_seq_len = 1024
    a = m.attention
    a.num_heads, a.head_dim, a.rope_head_dim = 4, 64, 16
    a.q_lora_rank, a.o_groups, a.o_lora_rank = 96, 2, 64
    a.sliding_window = 32
    a.layer_types = ("sliding", "csa", "hca", "csa")
    a.csa_rate, a.index_topk, a.hca_rate = 4, 16, 16
    a.index_heads, a.index_head_dim = 8, 32
    a.indexer_loss_coef = 1.0  # the indexer learns (KL distillation, as DSA); 0 = random
    a.yarn_factor = 1.0  # no context extension at 256 tokens
    e = m.moe
    e.num_experts, e.top_k, e.expert_hidden = EXPERTS, TOP_K, EXPERT_HIDDEN
    e.num_hash_layers = 2
    e.swiglu_limit = 10.0
    e.dispatch, e.capacity_factor = "dropless", 0.0
    e.bias_update_rate, e.balance_loss_coef = 1e-3, 1e-4
    m.mtp.depth = 0
    return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg`: "v3" or "v4" (default)."""
    arch = arg or "v4"
    if arch not in ("v3", "v4"):
        raise ValueError(f"configs/arch_small.py: unknown variant {arch!r}; use 'v3' or 'v4'.")
    cfg = load_config_file(str(pathlib.Path(__file__).with_name("tiny.py")))
    cfg.model = _v3_model() if arch == "v3" else _v4_model()
    cfg.train.seq_len = SEQ_LEN
    cfg.optimizer.name = "adamw" if arch == "v3" else "muon"
    return cfg
