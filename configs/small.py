"""Small DeepSeek-shaped MoE for one GPU: ~101M parameters in total, ~23.5M active per token.

Parameter count (from `jax.eval_shape` of `Transformer.init`; tests/test_train.py holds it):
  total 100,786,688 = 7 MoE layers x 13.78M (32 routed experts of width 256, 1 shared
  expert and the router: 12.99M; attention 0.79M) + 1 dense layer 3.93M (FFN 3.15M,
  attention 0.79M) + embedding and LM head 0.39M (+ norms).
Active matmul weights per token 23.5M (attention 6.3M, dense FFN 3.1M, MoE 13.9M = 7 x
(4 routed + 1 shared) x 3 x 512 x 256 + routers, head 0.2M), so ~191 MFLOPs per token for
training at seq_len 1024 (`moejax.train.flops_per_token`).

bf16 compute over fp32 master weights, index dispatch, activations rematerialised except
matmul outputs ("dots"). 64 x 1024 tokens per step; raise train.micro_batches if memory
runs short. The byte tokenizer keeps the default corpus self-contained; point
data.tokenizer at a tokenizer.json (and raise model.vocab_size to its size) for real text.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    cfg = ml_collections.ConfigDict()

    cfg.model = model = ml_collections.ConfigDict()
    model.vocab_size = 384  # byte tokenizer (259 ids) padded to a multiple of 128
    model.embed_dim = 512  # D
    model.num_layers = 8  # 1 dense + 7 MoE
    model.num_dense_layers = 1  # DeepSeek first_k_dense_replace
    model.num_heads = 8  # H
    model.num_kv_heads = 4  # grouped-query attention
    model.head_dim = 64  # K
    model.mlp_hidden = 2048  # dense FFN width
    model.max_seq_len = 2048  # rotary tables cover up to this length
    model.norm_eps = 1e-6  # RMSNorm epsilon
    model.tie_embeddings = False  # separate LM head
    model.init_std = 0.02  # normal init std of every matrix
    model.dtype = "bfloat16"  # compute dtype
    model.param_dtype = "float32"  # fp32 master weights
    model.scan_layers = True  # one scanned stack per layer kind
    model.remat_policy = "dots"  # keep matmul outputs, recompute the rest
    model.attention_impl = "auto"  # "cudnn" on GPUs that support it

    model.rope = rope = ml_collections.ConfigDict()
    rope.theta = 10000.0  # rotary base
    rope.fraction = 1.0  # all head dims rotate
    rope.style = "half"  # rotate halves
    rope.yarn_factor = 1.0  # no YaRN
    rope.yarn_original_max_len = 4096  # (unused without YaRN)
    rope.yarn_beta_fast = 32.0  # (unused without YaRN)
    rope.yarn_beta_slow = 1.0  # (unused without YaRN)
    rope.yarn_mscale = 1.0  # (unused without YaRN)
    rope.yarn_mscale_all_dim = 0.0  # (unused without YaRN)

    model.moe = moe = ml_collections.ConfigDict()
    moe.num_experts = 32  # E fine-grained routed experts
    moe.top_k = 4  # T
    moe.expert_hidden = 256  # F
    moe.num_shared_experts = 1  # one shared expert of width F
    moe.score_fn = "sigmoid"  # DeepSeek-V3 scoring
    moe.renormalize = True  # top-k weights sum to 1
    moe.routed_scaling_factor = 1.0  # routed output scale
    moe.num_groups = 4  # group-limited routing: 4 groups of 8 experts
    moe.top_groups = 2  # each token picks experts from its 2 best groups
    moe.capacity_factor = 1.25  # per-group expert capacity
    moe.dispatch = "index"  # gather/scatter dispatch
    moe.group_size = 1024  # tokens per dispatch group
    moe.expert_parallel = "auto"  # shard_map for dropless on >1 device, else gspmd; or either
    moe.expert_transport = "auto"  # shard_map: "all_gather", "ragged" (gpu/tpu), "auto"
    moe.dropless_backend = "auto"  # dropless experts: ragged_dot (gpu/tpu), bulk (cpu), loop
    moe.balance_loss_coef = 1e-4  # small sequence-wise balance loss
    moe.z_loss_coef = 1e-4  # router z-loss
    moe.bias_update_rate = 1e-3  # aux-loss-free balancing step

    cfg.mesh = mesh = ml_collections.ConfigDict()
    mesh.data = -1  # every device a data-parallel replica
    mesh.fsdp = 1  # no parameter sharding on one GPU
    mesh.expert = 1  # experts on one device
    mesh.tensor = 1  # no tensor parallelism
    # Multi-slice jobs (TPU slices joined by the data-centre network): slices per axis;
    # each axis above then counts the devices of one slice. One slice: all resolve to 1.
    mesh.dcn_data = -1  # data parallelism across slices (the default)
    mesh.dcn_fsdp = 1
    mesh.dcn_expert = 1
    mesh.dcn_tensor = 1

    cfg.data = data = ml_collections.ConfigDict()
    data.source = "builtin"  # Python stdlib sources; use text/jsonl/arrayrecord for real data
    data.path = ""  # glob of input files
    data.text_field = "text"  # JSON Lines field holding the document
    data.tokenizer = "byte"  # or the path of a HuggingFace tokenizer.json
    data.validation_fraction = 0.02  # documents held out for validation
    data.shuffle_seed = 0  # seed of the document shuffle
    data.num_workers = 2  # grain worker processes feeding the GPU
    data.streams = 1  # packing streams per global batch; pods: a multiple of the hosts

    cfg.train = train = ml_collections.ConfigDict()
    train.steps = 20000  # optimizer steps (~1.3B tokens)
    train.batch_size = 64  # global batch (rows)
    train.seq_len = 1024  # tokens per row
    train.micro_batches = 1  # gradient accumulation splits
    train.seed = 0  # parameter init and per-step RNG
    train.log_every = 50  # steps between metric records
    train.save_every = 1000  # steps between checkpoints (plus a final one)
    train.keep_checkpoints = 3  # newest checkpoints kept
    train.eval_every = 1000  # steps between validation passes
    train.eval_batches = 32  # validation batches per evaluation
    train.peak_flops_per_device = 0.0  # 0 = look the device up in the table
    train.nonfinite = "stop"  # NaN/inf loss or gradient: "stop" the run, or "skip" the step
    train.max_skipped_steps = 5  # "skip": more skipped steps in a row than this stop the run
    train.spike_factor = 0.0  # > 1: skip steps whose loss > factor x running median (0 = off)
    train.spike_window = 64  # losses in that running median
    train.wandb_project = ""  # also log metrics to this W&B project ("" = off; `wandb` extra)

    cfg.optimizer = opt = ml_collections.ConfigDict()
    opt.name = "adamw"  # AdamW with decoupled weight decay
    opt.learning_rate = 1e-3  # peak learning rate
    opt.warmup_steps = 500  # linear warmup steps
    opt.decay = "cosine"  # cosine to end_lr_fraction * peak
    opt.end_lr_fraction = 0.1  # final learning rate / peak
    opt.b1 = 0.9  # Adam first-moment decay
    opt.b2 = 0.95  # Adam second-moment decay
    opt.eps = 1e-8  # Adam epsilon
    opt.weight_decay = 0.1  # decoupled weight decay on matrices
    opt.decay_embeddings = False  # no decay on embeddings / LM head
    opt.grad_clip_norm = 1.0  # global-norm clipping
    return cfg
