"""Typed, validated configuration.

Experiments are `configs/*.py` files whose `get_config(arg=None)` returns an
`ml_collections.ConfigDict`. `from_config_dict` turns it once into frozen dataclasses and
validates it, so a bad value fails here, with the field, the value and the fix, before
anything is traced. Every field is declared below with its meaning.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from moejax.config.checks import check as _check
from moejax.config.checks import choice as _choice
from moejax.config.choices import (
    bpe_vocab_size,
    ARCHITECTURES,
    ATTENTION_IMPLS,
    ATTENTION_TYPES,
    DISPATCHES,
    DROPLESS_BACKENDS,
    DTYPES,
    EXPERT_PARALLEL,
    EXPERT_TRANSPORTS,
    NONFINITE_POLICIES,
    REMAT_POLICIES,
    ROPE_STYLES,
    SCORE_FUNCTIONS,
)
from moejax.config.coerce import dataclass_from_dict
from moejax.config.mesh import MeshConfig, mesh_config
from moejax.config.v4 import V4Config, v4_config


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0  # base of the rotary frequencies
    fraction: float = 1.0  # share of each head's dims that rotate (partial rotary)
    style: str = "half"  # "half" (rotate halves, Llama/NeoX) or "interleaved" (pairs 2i, 2i+1)
    yarn_factor: float = 1.0  # YaRN context-extension factor; 1.0 disables YaRN
    yarn_original_max_len: int = 4096  # context length the base model was trained at
    yarn_beta_fast: float = 32.0  # YaRN ramp: rotations above which dims are not interpolated
    yarn_beta_slow: float = 1.0  # YaRN ramp: rotations below which dims are fully interpolated
    yarn_mscale: float = 1.0  # YaRN magnitude coefficient (numerator of the cos/sin factor)
    yarn_mscale_all_dim: float = 0.0  # YaRN magnitude coefficient (denominator); 0 = unused


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 8  # E: routed experts per MoE layer
    top_k: int = 2  # T: routed experts per token
    expert_hidden: int = 128  # F: hidden width of each routed SwiGLU expert
    num_shared_experts: int = 1  # shared experts applied to every token (one SwiGLU of width n*F)
    score_fn: str = "softmax"  # router scoring: "softmax" or "sigmoid"
    renormalize: bool = True  # renormalise the top-k weights to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies the routed output (DeepSeek-V3: 2.5)
    num_groups: int = 1  # expert groups for group-limited routing (1 = off)
    top_groups: int = 1  # groups kept per token in group-limited routing
    capacity_factor: float = 1.25  # C = ceil(cf * tokens_per_group * T / E); <= 0 = no drops
    # "dropless" (sorted, never drops; on a multi-device mesh it needs expert_parallel
    # "shard_map" or "auto": GSPMD cannot shard its sort), "index" (gather into capacity
    # buffers, GSPMD-sharded), "einsum" (GShard one-hots), "dense" (oracle)
    dispatch: str = "dropless"
    group_size: int = 512  # tokens per dispatch group (capacity is per group)
    dropless_backend: str = "auto"  # dropless experts: "auto", "bulk", "loop", "ragged_dot"
    # "gspmd" (GSPMD all-to-all), "shard_map" (explicit transport, moe/parallel/), "auto":
    # shard_map for dropless on a multi-device mesh, else gspmd (model/moe/execution.py)
    expert_parallel: str = "auto"
    expert_transport: str = "auto"  # shard_map: "all_gather", "ragged" (gpu/tpu), "auto" by platform
    balance_loss_coef: float = 0.0  # sequence-wise balance loss coefficient (0 disables)
    z_loss_coef: float = 0.0  # router z-loss coefficient (0 disables)
    bias_update_rate: float = 1e-3  # aux-loss-free balancing: bias += rate * sign(mean - load)


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3); used when attention_type == "mla"."""
    q_lora_rank: int = 0  # low-rank query latent width (0 = a plain D -> H*(nope+rope) query)
    kv_lora_rank: int = 64  # compressed key/value latent width (the cached state)
    qk_nope_head_dim: int = 32  # per-head query/key dims without rotary embedding
    qk_rope_head_dim: int = 16  # per-head query dims (and the one shared key) that rotate
    v_head_dim: int = 32  # per-head value dim


@dataclasses.dataclass(frozen=True)
class MTPConfig:
    """Multi-token prediction (DeepSeek-V3 section 2.2): extra heads predicting t+2."""
    depth: int = 0  # MTP modules (0 = off, 1 = one module predicting token t+2)
    loss_weight: float = 0.3  # lambda: weight of the MTP cross-entropy in the loss


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str = "transformer"  # see ARCHITECTURES; "deepseek_v4" builds a V4Config
    vocab_size: int = 512  # V
    embed_dim: int = 256  # D
    num_layers: int = 4  # decoder layers in total (dense + MoE)
    num_dense_layers: int = 1  # first layers with a dense FFN (DeepSeek first_k_dense_replace)
    num_heads: int = 4  # H: query heads
    num_kv_heads: int = 2  # key/value heads (grouped-query attention); divides num_heads
    head_dim: int = 64  # K: per-head dim
    mlp_hidden: int = 512  # hidden width of the dense SwiGLU FFN
    max_seq_len: int = 2048  # longest sequence the rotary tables cover
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the embedding matrix with the LM head
    init_std: float = 0.02  # std of the normal initialiser of every matrix
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters (fp32 master weights)
    scan_layers: bool = True  # stack layers with nn.scan (one stack dense, one MoE)
    remat_policy: str = "none"  # activation checkpointing: none|full|dots|dots_no_batch|save_moe
    # "auto" (einsum on CPU, xla elsewhere), "einsum" (heads-major einsums),
    # "xla" / "cudnn" (jax.nn.dot_product_attention), "reference"
    attention_impl: str = "auto"
    attention_type: str = "gqa"  # "gqa" (grouped-query) or "mla" (multi-head latent, see mla)
    rope: RopeConfig = RopeConfig()
    moe: MoEConfig = MoEConfig()
    mla: MLAConfig = MLAConfig()
    mtp: MTPConfig = MTPConfig()

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    @property
    def tensor_heads(self) -> tuple[str, int]:
        """(field, count) of the heads split over the tensor axis: MLA's query heads, GQA's
        key/value heads."""
        if self.attention_type == "mla":
            return "num_heads", self.num_heads
        return "num_kv_heads", self.num_kv_heads


# What `Config.model` holds; both share vocab_size, embed_dim, num_layers, max_seq_len, dtype,
# moe.num_experts / top_k / bias_update_rate, mtp.depth / loss_weight, num_dense_layers.
AnyModelConfig = ModelConfig | V4Config


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "builtin"  # "builtin" (stdlib sources), "text", "jsonl", "arrayrecord", "parquet"
    path: str = ""  # glob of input files for text / jsonl / arrayrecord / parquet
    text_field: str = "text"  # jsonl / arrayrecord field, or parquet column, of the text
    # "byte" (UTF-8 bytes, 259 ids), "bpe:N" (byte-level BPE of N ids trained on the train
    # split, cached as <workdir>/tokenizer.json; moejax/data/bpe.py) or the path of a
    # HuggingFace tokenizer.json
    tokenizer: str = "byte"
    validation_fraction: float = 0.05  # share of documents held out (by hash of their name)
    shuffle_seed: int = 0  # seed of the global shuffle
    # Packed train rows are permuted within windows of this many rows (per stream; 0 = off),
    # so a batch mixes rows of many documents (moejax/data/window_shuffle.py)
    shuffle_window: int = 0
    num_workers: int = 0  # grain worker processes per packing stream (0 = in the main process)
    # Packing streams making up each global batch (see moejax/data/streams.py): the batch
    # is the same whatever the process count; a process packs only the streams holding its
    # rows, so at scale use a multiple of the host count. Changing it changes the data.
    streams: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # global batch (rows of seq_len tokens)
    seq_len: int = 256  # tokens per row
    micro_batches: int = 1  # gradient accumulation: batch_size is split into this many
    loss_chunk: int = 0  # > 0: cross-entropy over sequence tiles of this many positions,
    # never holding [B, L, V] logits (moejax.train.cross_entropy); 0: whole logits
    seed: int = 0  # parameter init and per-step RNG (fold_in(seed, step))
    log_every: int = 10  # steps between metric writes
    save_every: int = 200  # steps between checkpoints (a final one is always written)
    keep_checkpoints: int = 3  # newest checkpoints kept
    eval_every: int = 0  # steps between validation passes during training (0 = only at end)
    eval_batches: int = 8  # validation batches per evaluation
    peak_flops_per_device: float = 0.0  # for MFU; 0 = look the device up in a table
    # Non-finite guard (moejax/train/guard.py): "stop" ends the run at the first step whose
    # loss terms or gradient norm are NaN/inf, saving nothing after it; "skip" leaves the
    # state unchanged for such a step and goes on
    nonfinite: str = "stop"
    max_skipped_steps: int = 5  # more skipped steps than this in a row stop the run
    spike_factor: float = 0.0  # > 1: skip a step whose loss > factor x running median; 0 = off
    spike_window: int = 64  # accepted losses the running median is taken over
    wandb_project: str = ""  # also log the metrics to this Weights & Biases project ("" = off;
    # the `wandb` extra; moejax/train/wandb_tracker.py)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"  # "adamw", or "muon" (Muon on matrices + AdamW on the rest, as V4)
    learning_rate: float = 3e-3  # peak learning rate
    warmup_steps: int = 50  # linear warmup from 0 to the peak
    decay: str = "cosine"  # "cosine" to end_lr_fraction * peak at the last step, or "constant"
    end_lr_fraction: float = 0.1  # final learning rate as a fraction of the peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled (AdamW) weight decay
    decay_embeddings: bool = False  # apply weight decay to embeddings / LM head
    grad_clip_norm: float = 1.0  # global-norm clipping (0 disables)
    muon_momentum: float = 0.95  # Muon: Nesterov momentum of the matrix updates
    muon_ns_steps: int = 5  # Muon: Newton-Schulz iterations of the orthogonalisation


def validate_model(m: ModelConfig) -> None:
    """Checks every model field; raises ValueError naming the field, value and fix."""
    for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "mlp_hidden", "max_seq_len"):
        _check(getattr(m, name) > 0, f"model.{name}", getattr(m, name), "must be > 0.")
    _check(0 <= m.num_dense_layers <= m.num_layers, "model.num_dense_layers",
           m.num_dense_layers, f"must be between 0 and model.num_layers={m.num_layers}.")
    _check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads", m.num_kv_heads,
           f"must divide model.num_heads={m.num_heads}.")
    _choice("model.architecture", m.architecture, ARCHITECTURES)
    _choice("model.dtype", m.dtype, DTYPES)
    _choice("model.param_dtype", m.param_dtype, DTYPES)
    _choice("model.remat_policy", m.remat_policy, REMAT_POLICIES)
    _choice("model.attention_impl", m.attention_impl, ATTENTION_IMPLS)
    _check(m.attention_impl != "splash" or m.attention_type == "mla", "model.attention_impl",
           m.attention_impl, "'splash' (TPU flash attention) is wired for attention_type="
           "'mla' only; use 'xla' for GQA.")
    _choice("model.rope.style", m.rope.style, ROPE_STYLES)
    _check(0.0 < m.rope.fraction <= 1.0, "model.rope.fraction", m.rope.fraction,
           "must be in (0, 1].")
    rot = int(m.head_dim * m.rope.fraction)
    _check(rot % 2 == 0 and rot > 0, "model.rope.fraction", m.rope.fraction,
           f"head_dim*fraction={m.head_dim * m.rope.fraction} must be a positive even integer.")
    _check(m.rope.yarn_factor >= 1.0, "model.rope.yarn_factor", m.rope.yarn_factor,
           "must be >= 1 (1 disables YaRN).")
    validate_moe(m.moe)
    _choice("model.attention_type", m.attention_type, ATTENTION_TYPES)
    if m.attention_type == "mla":
        validate_mla(m.mla)
    validate_mtp(m.mtp)


def validate_mla(a: MLAConfig) -> None:
    _check(a.q_lora_rank >= 0, "model.mla.q_lora_rank", a.q_lora_rank,
           "must be >= 0 (0 = plain query projection).")
    for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
        _check(getattr(a, name) > 0, f"model.mla.{name}", getattr(a, name), "must be > 0.")
    _check(a.qk_rope_head_dim > 0 and a.qk_rope_head_dim % 2 == 0, "model.mla.qk_rope_head_dim",
           a.qk_rope_head_dim, "must be a positive even number (rotary pairs).")


def validate_mtp(t: MTPConfig) -> None:
    _check(t.depth in (0, 1), "model.mtp.depth", t.depth, "must be 0 (off) or 1.")
    _check(t.loss_weight >= 0, "model.mtp.loss_weight", t.loss_weight, "must be >= 0.")


def validate_moe(e: MoEConfig) -> None:
    _check(e.num_experts > 0, "model.moe.num_experts", e.num_experts, "must be > 0.")
    _check(0 < e.top_k <= e.num_experts, "model.moe.top_k", e.top_k,
           f"must be between 1 and model.moe.num_experts={e.num_experts}.")
    _check(e.expert_hidden > 0, "model.moe.expert_hidden", e.expert_hidden, "must be > 0.")
    _check(e.num_shared_experts >= 0, "model.moe.num_shared_experts", e.num_shared_experts,
           "must be >= 0.")
    _choice("model.moe.score_fn", e.score_fn, SCORE_FUNCTIONS)
    _choice("model.moe.dispatch", e.dispatch, DISPATCHES)
    _choice("model.moe.expert_parallel", e.expert_parallel, EXPERT_PARALLEL)
    _choice("model.moe.expert_transport", e.expert_transport, EXPERT_TRANSPORTS)
    _choice("model.moe.dropless_backend", e.dropless_backend, DROPLESS_BACKENDS)
    _check(e.expert_parallel != "shard_map" or e.dispatch in ("index", "dropless"),
           "model.moe.dispatch", e.dispatch, "model.moe.expert_parallel='shard_map' runs "
           "'index' or 'dropless' per expert shard; pick one, or expert_parallel='gspmd'.")
    _check(e.group_size > 0, "model.moe.group_size", e.group_size, "must be > 0.")
    _check(e.num_groups > 0 and e.num_experts % e.num_groups == 0, "model.moe.num_groups",
           e.num_groups, f"must divide model.moe.num_experts={e.num_experts}.")
    _check(0 < e.top_groups <= e.num_groups, "model.moe.top_groups", e.top_groups,
           f"must be between 1 and model.moe.num_groups={e.num_groups}.")
    per_group = e.num_experts // e.num_groups
    _check(e.top_groups * per_group >= e.top_k, "model.moe.top_groups", e.top_groups,
           f"the kept groups hold {e.top_groups * per_group} experts < top_k={e.top_k}.")
    for name in ("balance_loss_coef", "z_loss_coef", "bias_update_rate"):
        _check(getattr(e, name) >= 0, f"model.moe.{name}", getattr(e, name), "must be >= 0.")


def model_config(section: Any) -> AnyModelConfig:
    """Builds and validates the model section: a ModelConfig, or a V4Config when
    `architecture == "deepseek_v4"`."""
    if dataclasses.is_dataclass(section):
        architecture = getattr(section, "architecture", "transformer")
    else:
        architecture = section.get("architecture", "transformer")
    _choice("model.architecture", architecture, ARCHITECTURES)
    return MODEL_SECTIONS[architecture](section)


def transformer_config(section: Any) -> ModelConfig:
    """Builds and validates a `moejax.Transformer` model section."""
    model = dataclass_from_dict(ModelConfig, section, "model")
    validate_model(model)
    return model


# model.architecture -> the builder of its model section (one entry per architecture).
MODEL_SECTIONS = {"transformer": transformer_config, "deepseek_v4": v4_config}


def validate_data(d: DataConfig) -> None:
    _choice("data.source", d.source, ("builtin", "text", "jsonl", "arrayrecord", "parquet"))
    _check(d.source == "builtin" or bool(d.path), "data.path", d.path,
           f"data.source={d.source!r} needs a glob of input files in data.path.")
    _check(0.0 <= d.validation_fraction < 1.0, "data.validation_fraction",
           d.validation_fraction, "must be in [0, 1).")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0.")
    _check(d.streams >= 1, "data.streams", d.streams, "must be >= 1.")
    _check(d.shuffle_window >= 0, "data.shuffle_window", d.shuffle_window,
           "must be >= 0 (rows per shuffle window; 0 = off).")
    bpe_vocab_size(d.tokenizer)  # a malformed "bpe:N" raises ValueError naming the fix


def validate_train(t: TrainConfig, model: AnyModelConfig) -> None:
    for name in ("steps", "batch_size", "seq_len", "micro_batches", "log_every",
                 "save_every", "keep_checkpoints", "eval_batches"):
        _check(getattr(t, name) > 0, f"train.{name}", getattr(t, name), "must be > 0.")
    _check(t.batch_size % t.micro_batches == 0, "train.micro_batches", t.micro_batches,
           f"must divide train.batch_size={t.batch_size}.")
    _check(t.seq_len <= model.max_seq_len, "train.seq_len", t.seq_len,
           f"must be <= model.max_seq_len={model.max_seq_len}.")
    _check(t.eval_every >= 0, "train.eval_every", t.eval_every, "must be >= 0.")
    _check(t.loss_chunk >= 0, "train.loss_chunk", t.loss_chunk,
           "must be >= 0 (0 = whole logits, N = tiles of N positions).")
    _choice("train.nonfinite", t.nonfinite, NONFINITE_POLICIES)
    _check(t.max_skipped_steps >= 0, "train.max_skipped_steps", t.max_skipped_steps,
           "must be >= 0 (skipped steps tolerated in a row).")
    _check(t.spike_factor == 0 or t.spike_factor > 1, "train.spike_factor", t.spike_factor,
           "must be 0 (off) or > 1 (skip a step whose loss exceeds factor x the median).")
    _check(t.spike_window > 0, "train.spike_window", t.spike_window, "must be > 0.")


def validate_optimizer(o: OptimizerConfig) -> None:
    _choice("optimizer.name", o.name, ("adamw", "muon"))
    _check(0 <= o.muon_momentum < 1, "optimizer.muon_momentum", o.muon_momentum,
           "must be in [0, 1).")
    _check(o.muon_ns_steps > 0, "optimizer.muon_ns_steps", o.muon_ns_steps, "must be > 0.")
    _choice("optimizer.decay", o.decay, ("cosine", "constant"))
    _check(o.learning_rate > 0, "optimizer.learning_rate", o.learning_rate, "must be > 0.")
    _check(o.warmup_steps >= 0, "optimizer.warmup_steps", o.warmup_steps, "must be >= 0.")
    _check(o.grad_clip_norm >= 0, "optimizer.grad_clip_norm", o.grad_clip_norm,
           "must be >= 0 (0 disables clipping).")


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole resolved experiment; sections absent from the ConfigDict take defaults."""
    model: AnyModelConfig
    mesh: MeshConfig
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    optimizer: OptimizerConfig = OptimizerConfig()


def resolve(cfg: ml_collections.ConfigDict) -> Config:
    """Turns a ConfigDict into the frozen, validated `Config` (raises ValueError)."""
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(cfg.keys()) - known)
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; known: {sorted(known)}.")
    if "model" not in cfg:
        raise ValueError("config has no 'model' section; every config needs one.")
    model = model_config(cfg.model)
    mesh = mesh_config(cfg.get("mesh", {}), model)
    data = dataclass_from_dict(DataConfig, cfg.get("data", {}), "data")
    train = dataclass_from_dict(TrainConfig, cfg.get("train", {}), "train")
    optimizer = dataclass_from_dict(OptimizerConfig, cfg.get("optimizer", {}), "optimizer")
    validate_data(data)
    validate_train(train, model)
    _check(train.batch_size % data.streams == 0, "data.streams", data.streams,
           f"must divide train.batch_size={train.batch_size} (each stream fills equal rows).")
    validate_optimizer(optimizer)
    return Config(model=model, mesh=mesh, data=data, train=train, optimizer=optimizer)


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field and the fix if any section is invalid."""
    resolve(cfg)


__all__ = ["AnyModelConfig", "Config", "DataConfig", "MLAConfig", "MTPConfig", "MoEConfig",
           "ModelConfig", "OptimizerConfig", "RopeConfig", "TrainConfig", "model_config",
           "resolve", "validate"]

