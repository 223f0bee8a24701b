"""DeepSeek-V3: multi-head latent attention, 256 fine-grained experts, MTP (arXiv 2412.19437).

    get_config("671b")  the published model (config.json of deepseek-ai/DeepSeek-V3):
                        61 layers (3 dense), MLA 1536/512/128+64/128, 256 experts top-8 with
                        group-limited routing (8 groups, 4 kept), 1 shared expert, YaRN x40,
                        one MTP module. 671.0B parameters without MTP (682.6B with it).
    get_config("tiny")  the same structure at CPU size (the tiny V3 of the parity tests,
                        vocabulary padded to 384 for the byte tokenizer).

The data, train and optimizer sections start from configs/tiny.py; the 671b variant sets
the paper's optimizer hyper-parameters (AdamW 2.2e-4, bias rate 1e-3, ...) and the shape of
MaxText's published v5p-1024 recipe (512 chips, 6 x 8192 tokens per chip, fp32 weights).
"""
from __future__ import annotations

import pathlib

import ml_collections

from moejax.config import load_config_file


def _model(full: bool) -> ml_collections.ConfigDict:
    model = ml_collections.ConfigDict()
    model.vocab_size = 129280 if full else 384  # V (tiny: byte tokenizer, 259 ids, padded)
    model.embed_dim = 7168 if full else 64  # D (hidden_size)
    model.num_layers = 61 if full else 4  # decoder layers (dense + MoE), MTP not included
    model.num_dense_layers = 3 if full else 1  # first_k_dense_replace
    model.num_heads = 128 if full else 4  # H
    model.num_kv_heads = 128 if full else 4  # unused by MLA (kept = num_heads)
    model.head_dim = 192 if full else 24  # unused by MLA (= qk_nope + qk_rope, for reference)
    model.mlp_hidden = 18432 if full else 96  # dense FFN width (intermediate_size)
    model.max_seq_len = 163840 if full else 2560  # max_position_embeddings (= 40 x original)
    model.norm_eps = 1e-6  # rms_norm_eps
    model.tie_embeddings = False  # separate embedding and LM head
    model.init_std = 0.006 if full else 0.02  # paper: std 0.006
    model.dtype = "bfloat16" if full else "float32"  # compute dtype
    model.param_dtype = "float32"  # fp32 master weights
    model.scan_layers = True  # one scanned stack per layer kind
    model.remat_policy = "full" if full else "none"  # activation checkpointing
    model.attention_impl = "auto"  # "auto", "einsum", "xla", "cudnn", "reference"
    model.attention_type = "mla"  # multi-head latent attention

    model.mla = mla = ml_collections.ConfigDict()
    mla.q_lora_rank = 1536 if full else 48  # low-rank query latent
    mla.kv_lora_rank = 512 if full else 32  # compressed key/value latent (what decode caches)
    mla.qk_nope_head_dim = 128 if full else 16  # per-head query/key dims without RoPE
    mla.qk_rope_head_dim = 64 if full else 8  # per-head rotary dims (one shared rope key)
    mla.v_head_dim = 128 if full else 16  # per-head value dim

    model.rope = rope = ml_collections.ConfigDict()
    rope.theta = 10000.0  # rope_theta
    rope.fraction = 1.0  # MLA rotates exactly qk_rope_head_dim channels (field unused)
    rope.style = "interleaved"  # rope_interleave = true: pairs (2i, 2i+1)
    rope.yarn_factor = 40.0  # YaRN factor
    rope.yarn_original_max_len = 4096 if full else 64  # original_max_position_embeddings
    rope.yarn_beta_fast = 32.0  # beta_fast
    rope.yarn_beta_slow = 1.0  # beta_slow
    rope.yarn_mscale = 1.0  # mscale (cos/sin factor numerator)
    rope.yarn_mscale_all_dim = 1.0  # mscale_all_dim (also the softmax-scale correction)

    model.moe = moe = ml_collections.ConfigDict()
    moe.num_experts = 256 if full else 8  # n_routed_experts
    moe.top_k = 8 if full else 2  # num_experts_per_tok
    moe.expert_hidden = 2048 if full else 32  # moe_intermediate_size
    moe.num_shared_experts = 1  # n_shared_experts
    moe.score_fn = "sigmoid"  # scoring_func
    moe.renormalize = True  # norm_topk_prob
    moe.routed_scaling_factor = 2.5  # routed_scaling_factor
    moe.num_groups = 8 if full else 4  # n_group
    moe.top_groups = 4 if full else 2  # topk_group
    moe.capacity_factor = 1.25 if full else 1.5  # DeepSeek trains dropless (0 = no drops)
    moe.dispatch = "index"  # gather/scatter dispatch
    moe.group_size = 512  # tokens per dispatch group
    moe.expert_parallel = "auto"  # shard_map for dropless on >1 device, else gspmd; or either
    moe.expert_transport = "auto"  # shard_map: "all_gather", "ragged" (gpu/tpu), "auto"
    moe.dropless_backend = "auto"  # dropless experts: ragged_dot (gpu/tpu), bulk (cpu), loop
    moe.balance_loss_coef = 1e-4  # paper: sequence-wise balance loss alpha = 0.0001
    moe.z_loss_coef = 0.0  # not used by DeepSeek-V3
    moe.bias_update_rate = 1e-3  # paper: gamma = 0.001 (aux-loss-free balancing)

    model.mtp = mtp = ml_collections.ConfigDict()
    mtp.depth = 1  # num_nextn_predict_layers
    mtp.loss_weight = 0.3  # paper: lambda = 0.3 for the first 10T tokens, then 0.1
    return model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg`: "671b" (published sizes) or "tiny" (default)."""
    arg = arg or "tiny"
    if arg not in ("671b", "tiny"):
        raise ValueError(f"configs/deepseek_v3.py: unknown variant {arg!r}; use '671b' or 'tiny'.")
    full = arg == "671b"
    cfg = load_config_file(str(pathlib.Path(__file__).with_name("tiny.py")))
    cfg.data.tokenizer = "byte"  # vocab_size 384 below (tiny.py's quick start uses a BPE)
    cfg.model = _model(full)
    if full:  # MaxText's v5p recipe: v5p-1024 (512 chips), 6 x 8192 tokens per chip
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.expert = 1, -1, 8  # experts over 8-chip slices
        cfg.model.attention_impl = "splash"  # TPU flash attention (no [B, H, L, L] logits)
        cfg.train.seq_len = 8192
        cfg.train.batch_size = 3072  # 25.2M tokens per step (paper: 3072 -> 15360 x 4096)
        cfg.train.micro_batches = 6  # one sequence per chip per forward/backward
        cfg.train.loss_chunk = 1024  # cross-entropy over 1024-position tiles
        cfg.train.steps = 100000  # optimizer steps
        cfg.optimizer.learning_rate = 2.2e-4  # paper: peak 2.2e-4
        cfg.optimizer.warmup_steps = 2000  # paper: 2K warmup steps
        cfg.optimizer.weight_decay = 0.1  # paper: 0.1
    return cfg
