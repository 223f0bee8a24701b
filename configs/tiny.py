"""Tiny DeepSeek-shaped MoE: trains on a laptop CPU in minutes (the default experiment).

One dense layer, then MoE layers of fine-grained routed experts plus one shared expert, on
the built-in corpus (the Python standard library's sources) through a byte-level BPE of
4096 ids trained on the train split at start-up (cached as <workdir>/tokenizer.json).
2.39M parameters (1.20M active per token; 0.52M are the embedding and LM head), 8.8
MFLOPs per token for training at seq_len 256 (`python -m moejax.plan --config
configs/tiny.py`).

Measured 2026-12-06 on a quiet 2-core AMD EPYC (load average 0.17): the README's first
command (train.py then eval.py, 300 steps, 1.2M tokens ~ 4 MB of text) took 3 min 28 s
wall (359 s CPU) and reached 1.583 held-out bits/byte, below gzip -9 (1.832) and above
xz -9e (1.461) on the same bytes.

    python train.py --config configs/tiny.py --workdir /tmp/tiny
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    cfg = ml_collections.ConfigDict()

    cfg.model = model = ml_collections.ConfigDict()
    model.vocab_size = 4096  # = the BPE's vocabulary (data.tokenizer); 384 for 'byte'
    model.embed_dim = 128  # D (256 ran 2.3x slower per token on 2 CPU cores)
    model.num_layers = 4  # 1 dense + 3 MoE
    model.num_dense_layers = 1  # DeepSeek first_k_dense_replace
    model.num_heads = 4
    model.num_kv_heads = 2  # grouped-query attention
    model.head_dim = 32
    model.mlp_hidden = 384  # dense FFN width
    model.max_seq_len = 1024
    model.norm_eps = 1e-6
    model.tie_embeddings = False
    model.init_std = 0.02
    model.dtype = "float32"  # compute dtype (bf16 brings nothing on CPU)
    model.param_dtype = "float32"
    model.scan_layers = True
    model.remat_policy = "none"
    model.attention_impl = "auto"  # einsum on CPU, xla on GPU/TPU

    model.rope = rope = ml_collections.ConfigDict()
    rope.theta = 10000.0
    rope.fraction = 1.0
    rope.style = "half"
    rope.yarn_factor = 1.0
    rope.yarn_original_max_len = 4096
    rope.yarn_beta_fast = 32.0
    rope.yarn_beta_slow = 1.0
    rope.yarn_mscale = 1.0
    rope.yarn_mscale_all_dim = 0.0

    model.moe = moe = ml_collections.ConfigDict()
    moe.num_experts = 8  # E fine-grained routed experts
    moe.top_k = 2  # T
    moe.expert_hidden = 96  # F
    moe.num_shared_experts = 1
    moe.score_fn = "sigmoid"  # DeepSeek-V3 scoring
    moe.renormalize = True
    moe.routed_scaling_factor = 1.0
    moe.num_groups = 1  # group-limited routing off
    moe.top_groups = 1
    moe.capacity_factor = 1.5
    moe.dispatch = "dropless"  # sorted by expert, never drops; fastest on CPU (bench/README.md)
    moe.group_size = 512
    moe.expert_parallel = "auto"  # shard_map for dropless on >1 device, else gspmd; or either
    moe.expert_transport = "auto"  # shard_map: "all_gather", "ragged" (gpu/tpu), "auto"
    moe.dropless_backend = "auto"  # dropless experts: ragged_dot (gpu/tpu), bulk (cpu), loop
    moe.balance_loss_coef = 1e-4  # small sequence-wise loss beside the bias balancing
    moe.z_loss_coef = 1e-4
    moe.bias_update_rate = 1e-2  # fast enough to rebalance within a few hundred steps

    cfg.mesh = mesh = ml_collections.ConfigDict()
    mesh.data = -1  # every device replicates (one CPU device by default)
    mesh.fsdp = 1
    mesh.expert = 1
    mesh.tensor = 1
    # Multi-slice jobs (TPU slices joined by the data-centre network): slices per axis;
    # each axis above then counts the devices of one slice. One slice: all resolve to 1.
    mesh.dcn_data = -1  # data parallelism across slices (the default)
    mesh.dcn_fsdp = 1
    mesh.dcn_expert = 1
    mesh.dcn_tensor = 1

    cfg.data = data = ml_collections.ConfigDict()
    data.source = "builtin"  # Python stdlib sources (~12 MB of text), no download
    data.path = ""  # glob of input files (text / jsonl / arrayrecord sources)
    data.text_field = "text"  # JSON Lines field holding the document
    # Byte-level BPE of 4096 ids trained on a 2 MB sample of the train split in ~1 s,
    # cached in the workdir (3.4 bytes/token on held-out stdlib code); "byte": 259 ids
    data.tokenizer = "bpe:4096"
    data.validation_fraction = 0.05  # share of documents held out for validation
    data.shuffle_seed = 0  # seed of the global document shuffle
    # Packed rows permuted within windows of 256 rows (16 batches). 100-step runs, bpe:4096:
    # 2.64 held-out bits/byte without it, 2.14 with it (byte tokenizer, no window: 3.69)
    data.shuffle_window = 256
    data.num_workers = 0  # grain worker processes (0 = in the main process)
    data.streams = 1  # packing streams per global batch; pods: a multiple of the hosts

    cfg.train = train = ml_collections.ConfigDict()
    train.steps = 300  # optimizer steps (~1.2M tokens; 337 s of CPU on 2 cores)
    train.batch_size = 16  # global batch (rows)
    train.seq_len = 256  # tokens per row
    train.micro_batches = 1  # gradient accumulation splits
    train.loss_chunk = 0  # cross-entropy tiles of N positions (0: whole [B, L, V] logits)
    train.seed = 0  # parameter init and per-step RNG
    train.log_every = 20  # steps between metric records
    train.save_every = 100  # steps between checkpoints (plus a final one)
    train.keep_checkpoints = 2  # newest checkpoints kept
    train.eval_every = 0  # steps between validation passes (0 = only at the end)
    train.eval_batches = 16  # validation batches per evaluation
    train.peak_flops_per_device = 0.0  # for MFU; 0 = device table (CPU: an estimate)
    train.nonfinite = "stop"  # NaN/inf loss or gradient: "stop" the run, or "skip" the step
    train.max_skipped_steps = 5  # "skip": more skipped steps in a row than this stop the run
    train.spike_factor = 0.0  # > 1: skip steps whose loss > factor x running median (0 = off)
    train.spike_window = 64  # losses in that running median
    train.wandb_project = ""  # also log metrics to this W&B project ("" = off; `wandb` extra)

    cfg.optimizer = opt = ml_collections.ConfigDict()
    opt.name = "adamw"  # AdamW with decoupled weight decay
    opt.learning_rate = 2e-3  # peak (byte tokenizer: 3e-3 ended worse, 3.40 vs 3.15 bits/byte)
    opt.warmup_steps = 30  # linear warmup steps from 0
    opt.decay = "cosine"  # cosine decay to end_lr_fraction * peak at the last step
    opt.end_lr_fraction = 0.1  # final learning rate / peak
    opt.b1 = 0.9  # Adam first-moment decay
    opt.b2 = 0.95  # Adam second-moment decay
    opt.eps = 1e-8  # Adam epsilon
    opt.weight_decay = 0.1  # decoupled weight decay (matrices only, see optimizer.py)
    opt.decay_embeddings = False  # also decay the embedding and LM head
    opt.grad_clip_norm = 1.0  # global-norm clipping (0 = off)
    return cfg
