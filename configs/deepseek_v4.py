"""DeepSeek-V4 (April 2026): `flash` (284B / 13B active), `pro` (1.6T / 49B), `tiny` (CPU).

    python -m moejax.plan --config configs/deepseek_v4.py:pro
    moejax.load_config_file("configs/deepseek_v4.py:tiny")

The `model` section holds the fields of `moejax.model.v4_config.V4Config` (its
`architecture = "deepseek_v4"` makes `moejax.config.resolve` build one, so train.py and
eval.py run these configs: `python train.py --config configs/deepseek_v4.py:tiny`); the
mesh / data / train / optimizer sections are configs/tiny.py's.
Published values are spec section 4 ([CFG] config.json); the per-layer schedule is the
published `compress_ratios` (0 sliding-only, 4 CSA, 128 HCA; its last entry is the MTP
layer's). `tiny` keeps every path live at CPU size: a sliding layer, CSA with index_topk
smaller than the visible entries, HCA, two hash-routed layers, a clamp that bites
(swiglu_limit 1 with ~0.1-scale pre-activations after training starts), MTP.
"""
import pathlib

import ml_collections

from moejax.config import load_config_file

FLASH_RATIOS = [0, 0] + [4, 128] * 20 + [4] + [0]  # 43 layers + the MTP layer
PRO_RATIOS = [128, 128] + [4, 128] * 29 + [4] + [0]  # 61 layers + the MTP layer
RATIO_TO_TYPE = {0: "sliding", 4: "csa", 128: "hca"}


def _model(size: str) -> ml_collections.ConfigDict:
    flash, pro = size == "flash", size == "pro"
    m = ml_collections.ConfigDict()
    m.architecture = "deepseek_v4"  # the model section is a V4Config (moejax.TransformerV4)
    m.vocab_size = 129280 if (flash or pro) else 384  # V (tiny: byte tokenizer, padded)
    m.embed_dim = {"flash": 4096, "pro": 7168}.get(size, 64)  # D
    m.num_layers = {"flash": 43, "pro": 61}.get(size, 4)  # decoder layers, all MoE
    m.max_seq_len = 1048576 if (flash or pro) else 1024  # longest sequence (decode caches)
    m.norm_eps = 1e-6  # RMSNorm epsilon
    m.init_std = 0.02  # normal init std of matrices
    m.dtype = "bfloat16" if (flash or pro) else "float32"  # compute dtype
    m.param_dtype = "float32"  # fp32 master weights
    m.scan_layers = flash or pro  # scan repeated layer kinds (tiny: unrolled loop)
    m.remat_policy = "full" if (flash or pro) else "none"  # activation checkpointing

    m.attention = a = ml_collections.ConfigDict()
    a.num_heads = {"flash": 64, "pro": 128}.get(size, 4)  # H query heads (one K=V head)
    a.head_dim = 512 if (flash or pro) else 32  # dh
    a.rope_head_dim = 64 if (flash or pro) else 8  # dr trailing rotary channels
    a.q_lora_rank = {"flash": 1024, "pro": 1536}.get(size, 32)  # dq
    a.o_groups = {"flash": 8, "pro": 16}.get(size, 2)  # g output-projection groups
    a.o_lora_rank = 1024 if (flash or pro) else 16  # r per-group output rank
    a.sliding_window = 128 if (flash or pro) else 16  # W
    a.query_tile = 1024 if (flash or pro) else 0  # attention in 1024-query tiles (memory)
    ratios = {"flash": FLASH_RATIOS, "pro": PRO_RATIOS}.get(size)
    a.layer_types = (tuple(RATIO_TO_TYPE[r] for r in ratios[:m.num_layers]) if ratios
                     else ("sliding", "csa", "hca", "csa"))  # per layer: sliding|csa|hca
    a.csa_rate = 4  # m: CSA window (entries cover 2m tokens, stride m)
    a.hca_rate = 128 if (flash or pro) else 8  # m': HCA window
    a.index_heads = 64 if (flash or pro) else 16  # HI lightning-indexer heads
    a.index_head_dim = 128 if (flash or pro) else 16  # dI
    a.index_topk = {"flash": 512, "pro": 1024}.get(size, 4)  # kI entries kept per query
    a.indexer_loss_coef = 0.0  # weight of the indexer's KL distillation loss (0 = untrained)
    a.indexer_warmup = False  # DSA dense warm-up: CSA attends to every visible entry
    a.rope_theta = 10000.0  # main table (sliding-only layers)
    a.compress_rope_theta = 160000.0  # compress table (CSA / HCA layers)
    a.yarn_factor = 16.0  # YaRN on the compress table
    a.yarn_original_max_len = 65536
    a.yarn_beta_fast = 32.0
    a.yarn_beta_slow = 1.0

    m.moe = e = ml_collections.ConfigDict()
    e.num_experts = {"flash": 256, "pro": 384}.get(size, 8)  # E routed experts
    e.top_k = 6 if (flash or pro) else 2  # k experts per token
    e.expert_hidden = {"flash": 2048, "pro": 3072}.get(size, 32)  # I
    e.num_shared_experts = 1  # one shared expert of width I
    e.score_fn = "sqrtsoftplus"  # sqrt(softplus(logit))
    e.routed_scaling_factor = {"flash": 1.5, "pro": 2.5}.get(size, 1.5)
    e.num_hash_layers = 3 if (flash or pro) else 2  # first layers routed by tid2eid[token]
    e.swiglu_limit = 10.0 if (flash or pro) else 1.0  # clamp of expert pre-activations
    e.dispatch = "index" if (flash or pro) else "dense"  # dense = oracle (CPU-size only)
    e.capacity_factor = 1.25 if (flash or pro) else 0.0  # <= 0: no drops
    e.group_size = 512  # tokens per dispatch group
    e.dropless_backend = "auto"  # dropless experts: ragged_dot (gpu/tpu), bulk (cpu), loop
    e.balance_loss_coef = 1e-4  # small sequence-wise balance loss
    e.z_loss_coef = 0.0  # router z-loss
    e.bias_update_rate = 1e-3  # aux-loss-free balancing rate

    m.hc = h = ml_collections.ConfigDict()
    h.hc_mult = 4  # n residual streams
    h.sinkhorn_iters = 20  # Sinkhorn-Knopp iterations
    h.eps = 1e-6  # hc_eps

    m.mtp = t = ml_collections.ConfigDict()
    t.depth = 1  # one MTP block (in the released checkpoints)
    t.loss_weight = 0.3  # weight of the MTP loss
    t.layer_type = "sliding"  # trailing compress ratio 0
    return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = arg or "tiny"
    if size not in ("flash", "pro", "tiny"):
        raise ValueError(f"configs/deepseek_v4.py: unknown variant {size!r}; "
                         "use flash, pro or tiny.")
    cfg = load_config_file(str(pathlib.Path(__file__).with_name("tiny.py")))
    cfg.data.tokenizer = "byte"  # vocab_size 384 below (tiny.py's quick start uses a BPE)
    cfg.model = _model(size)
    if size == "flash":  # v5p-512 (256 chips): mesh fsdp 32 x expert 8, 2.1M tokens/step
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.expert = 1, -1, 8
        cfg.train.seq_len = 4096
        cfg.train.batch_size = 512  # 2 sequences per chip
        cfg.train.loss_chunk = 512  # cross-entropy over 512-position tiles (no [B, L, V])
    if size == "pro":  # v5p-2048 (1024 chips): mesh fsdp 16 x expert 64, 8.4M tokens/step
        # expert 64: 6 of the 384 experts per chip, so a layer's gathered expert weights
        # are 6 experts' (fsdp 128 x expert 8 gathered 48: 2 GiB per matrix per layer)
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.expert = 1, -1, 64
        cfg.model.remat_policy = "offload"  # layer inputs (the 4 streams) to host memory
        cfg.train.seq_len = 4096
        cfg.train.batch_size = 2048  # 2 sequences per chip
        cfg.train.micro_batches = 2  # one sequence per chip per forward/backward
        cfg.train.loss_chunk = 512
    return cfg
