"""Typed, validated configuration of a DeepSeek-V4 model (`TransformerV4`).

Frozen dataclasses with one line per field; `v4_config(section)` builds them from a dict /
ConfigDict (the `model.v4` section of an experiment, or the `model` section of
configs/deepseek_v4.py) and `validate_v4` raises ValueError naming the field, its value and
the fix. Attribute names shared with `moejax.config.ModelConfig` (vocab_size, embed_dim,
num_layers, dtype, moe.num_experts, moe.bias_update_rate, mtp.depth, ...) mean the same
thing, so training code that reads those works on either config.

Layer types: "sliding" (sliding-window attention only), "csa" (compressed sparse attention:
overlapping windows of 2*csa_rate tokens, stride csa_rate, plus the lightning indexer),
"hca" (heavily compressed attention: non-overlapping windows of hca_rate tokens, dense).
As in HuggingFace, CSA always uses the overlapped compressor and HCA never does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from moejax.config.checks import check as _check
from moejax.config.choices import (
    DROPLESS_BACKENDS,
    DTYPES,
    EXPERT_PARALLEL,
    EXPERT_TRANSPORTS,
    REMAT_POLICIES,
)
from moejax.config.coerce import dataclass_from_dict

LAYER_TYPES = ("sliding", "csa", "hca")
V4_SCORE_FUNCTIONS = ("sqrtsoftplus", "sigmoid", "softmax")
V4_DISPATCHES = ("dense", "index", "dropless")
# The published `compress_ratios` (one int per layer) -> layer type; CSA (rate 4) is the
# overlapping one (docs/deepseek_v3_v4.md).
RATIO_TO_TYPE = {0: "sliding", 4: "csa", 128: "hca"}


@dataclasses.dataclass(frozen=True)
class V4AttentionConfig:
    num_heads: int = 4  # H query heads; one shared key=value head serves all of them
    head_dim: int = 32  # dh: width of every query head and of the single K=V head
    rope_head_dim: int = 8  # dr: trailing channels of each head that rotate (interleaved)
    q_lora_rank: int = 32  # dq: low-rank query latent (also the indexer's query input)
    o_groups: int = 2  # g: head groups of the grouped low-rank output projection
    o_lora_rank: int = 16  # r: per-group width of the grouped output projection
    sliding_window: int = 16  # W: keys t-W < s <= t of the sliding-window branch
    query_tile: int = 0  # > 0: attention in tiles of this many queries (memory), 0 = whole
    layer_types: tuple[str, ...] = ("sliding", "csa", "hca", "csa")  # per layer: LAYER_TYPES
    csa_rate: int = 4  # m: tokens per CSA window (each entry covers 2m tokens, stride m)
    hca_rate: int = 8  # m': tokens per HCA window (non-overlapping)
    index_heads: int = 16  # HI: lightning-indexer query heads
    index_head_dim: int = 16  # dI: lightning-indexer head width (and compressed key width)
    index_topk: int = 4  # kI: compressed entries each CSA query keeps
    indexer_loss_coef: float = 0.0  # weight of the indexer's KL distillation loss (0 = off)
    indexer_warmup: bool = False  # DSA dense warm-up: CSA attends to every visible entry
    rope_theta: float = 10000.0  # base of the "main" table (sliding-only layers, no YaRN)
    compress_rope_theta: float = 160000.0  # base of the "compress" table (CSA / HCA layers)
    yarn_factor: float = 16.0  # YaRN factor of the compress table (1 = no YaRN)
    yarn_original_max_len: int = 65536  # YaRN original context of the compress table
    yarn_beta_fast: float = 32.0  # YaRN ramp start (rotations over the original context)
    yarn_beta_slow: float = 1.0  # YaRN ramp end


@dataclasses.dataclass(frozen=True)
class V4MoEConfig:
    num_experts: int = 8  # E routed experts per layer (every V4 layer is MoE)
    top_k: int = 2  # k experts per token
    expert_hidden: int = 32  # I: hidden width of each routed expert (and the shared one)
    num_shared_experts: int = 1  # shared experts (one SwiGLU of width n*I); HF builds 1
    score_fn: str = "sqrtsoftplus"  # sqrt(softplus(logit)) | sigmoid | softmax
    routed_scaling_factor: float = 1.5  # multiplies the renormalised routed weights
    num_hash_layers: int = 2  # first layers route by the frozen tid2eid[token] table
    swiglu_limit: float = 1.0  # gate <= L, -L <= up <= L in every expert; 0 = no clamp
    dispatch: str = "dense"  # "index" (capacity buffers), "dropless" (sorted) or "dense" (oracle)
    capacity_factor: float = 0.0  # C = ceil(cf * S * k / E); <= 0 = no drops
    group_size: int = 512  # tokens per dispatch group (capacity is per group)
    dropless_backend: str = "auto"  # dropless experts: "auto", "bulk", "loop", "ragged_dot"
    expert_parallel: str = "auto"  # "gspmd", "shard_map" or "auto" (model/moe/execution.py)
    expert_transport: str = "auto"  # shard_map: "all_gather", "ragged" (gpu/tpu), "auto"
    balance_loss_coef: float = 0.0  # sequence-wise balance loss coefficient
    z_loss_coef: float = 0.0  # router z-loss coefficient
    bias_update_rate: float = 1e-3  # aux-loss-free balancing rate (non-hash layers use it)


@dataclasses.dataclass(frozen=True)
class HyperConfig:
    hc_mult: int = 4  # n: residual streams of the manifold-constrained hyper-connections
    sinkhorn_iters: int = 20  # Sinkhorn-Knopp iterations of the residual mixing matrix
    eps: float = 1e-6  # hc_eps: added to pre weights, softmax and every denominator


@dataclasses.dataclass(frozen=True)
class V4MTPConfig:
    depth: int = 0  # MTP blocks (0 = off, 1 = one block predicting token t+2)
    loss_weight: float = 0.3  # weight of the MTP cross-entropy in the loss
    layer_type: str = "sliding"  # attention type of the MTP block (trailing compress ratio)


@dataclasses.dataclass(frozen=True)
class V4Config:
    architecture: str = "deepseek_v4"  # marks the model section as V4 (moejax.config)
    vocab_size: int = 256  # V
    embed_dim: int = 64  # D
    num_layers: int = 4  # decoder layers (all MoE)
    max_seq_len: int = 4096  # longest sequence trained / decoded
    norm_eps: float = 1e-6  # epsilon of every RMSNorm (weighted and unweighted)
    init_std: float = 0.02  # std of the normal initialiser of every matrix
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the parameters
    scan_layers: bool = False  # scan runs of repeated layer kinds (False = unrolled loop)
    remat_policy: str = "none"  # activation checkpointing policy of each block
    attention: V4AttentionConfig = V4AttentionConfig()
    moe: V4MoEConfig = V4MoEConfig()
    hc: HyperConfig = HyperConfig()
    mtp: V4MTPConfig = V4MTPConfig()

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers

    @property
    def num_dense_layers(self) -> int:
        return 0

    def layer_type(self, layer: int) -> str:
        return self.attention.layer_types[layer]

    def is_hash(self, layer: int) -> bool:
        return layer < self.moe.num_hash_layers

    @property
    def tensor_heads(self) -> tuple[str, int]:
        """(field, count) of the heads split over the tensor axis: the query heads."""
        return "attention.num_heads", self.attention.num_heads


def layer_types_from_ratios(ratios: Sequence[int], num_layers: int) -> tuple[str, ...]:
    """Published `compress_ratios` (0 / 4 / 128, len N+1 with the MTP entry) -> N types."""
    bad = [r for r in ratios if r not in RATIO_TO_TYPE]
    if bad:
        raise ValueError(f"compress_ratios entries must be in {sorted(RATIO_TO_TYPE)}; got {bad}.")
    return tuple(RATIO_TO_TYPE[r] for r in ratios[:num_layers])


def _positive(obj: Any, prefix: str, names: Sequence[str]) -> None:
    for name in names:
        _check(getattr(obj, name) > 0, f"{prefix}.{name}", getattr(obj, name), "must be > 0.")


def validate_attention(a: V4AttentionConfig, num_layers: int, p: str) -> None:
    _positive(a, p, ("num_heads", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank",
                     "sliding_window", "csa_rate", "hca_rate", "index_heads", "index_head_dim",
                     "index_topk", "rope_theta", "compress_rope_theta", "yarn_original_max_len"))
    _check(a.rope_head_dim > 0 and a.rope_head_dim % 2 == 0 and a.rope_head_dim <= a.head_dim,
           f"{p}.rope_head_dim", a.rope_head_dim,
           f"must be a positive even number <= head_dim={a.head_dim}.")
    _check(a.index_head_dim % 2 == 0 and a.index_head_dim >= a.rope_head_dim,
           f"{p}.index_head_dim", a.index_head_dim,
           f"must be even and >= rope_head_dim={a.rope_head_dim} (its tail rotates too).")
    _check(a.num_heads % a.o_groups == 0, f"{p}.o_groups", a.o_groups,
           f"must divide num_heads={a.num_heads} (groups are contiguous heads).")
    _check(len(a.layer_types) == num_layers, f"{p}.layer_types", a.layer_types,
           f"needs one entry per layer (num_layers={num_layers}).")
    bad = [t for t in a.layer_types if t not in LAYER_TYPES]
    _check(not bad, f"{p}.layer_types", a.layer_types, f"entries must be in {list(LAYER_TYPES)}.")
    _check(a.query_tile >= 0 and a.query_tile % a.sliding_window == 0,
           f"{p}.query_tile", a.query_tile,
           f"must be 0 (whole sequence) or a multiple of sliding_window={a.sliding_window}.")
    _check(a.yarn_factor >= 1.0, f"{p}.yarn_factor", a.yarn_factor, "must be >= 1 (1 = off).")
    _check(a.indexer_loss_coef >= 0, f"{p}.indexer_loss_coef", a.indexer_loss_coef,
           "must be >= 0 (0 = no indexer training signal).")
    _check(a.yarn_beta_fast > a.yarn_beta_slow > 0, f"{p}.yarn_beta_fast", a.yarn_beta_fast,
           f"must be > yarn_beta_slow={a.yarn_beta_slow} > 0.")


def validate_moe(e: V4MoEConfig, num_layers: int, p: str) -> None:
    _positive(e, p, ("num_experts", "expert_hidden", "group_size"))
    _check(0 < e.top_k <= e.num_experts, f"{p}.top_k", e.top_k,
           f"must be between 1 and num_experts={e.num_experts}.")
    _check(e.num_shared_experts >= 0, f"{p}.num_shared_experts", e.num_shared_experts,
           "must be >= 0.")
    _check(e.score_fn in V4_SCORE_FUNCTIONS, f"{p}.score_fn", e.score_fn,
           f"use one of {list(V4_SCORE_FUNCTIONS)}.")
    _check(e.dispatch in V4_DISPATCHES, f"{p}.dispatch", e.dispatch,
           f"use one of {list(V4_DISPATCHES)}.")
    _check(e.expert_parallel in EXPERT_PARALLEL, f"{p}.expert_parallel", e.expert_parallel,
           f"use one of {list(EXPERT_PARALLEL)}.")
    _check(e.expert_transport in EXPERT_TRANSPORTS, f"{p}.expert_transport",
           e.expert_transport, f"use one of {list(EXPERT_TRANSPORTS)}.")
    _check(e.dropless_backend in DROPLESS_BACKENDS, f"{p}.dropless_backend",
           e.dropless_backend, f"use one of {list(DROPLESS_BACKENDS)}.")
    _check(e.expert_parallel != "shard_map" or e.dispatch in ("index", "dropless"),
           f"{p}.dispatch", e.dispatch, f"{p}.expert_parallel='shard_map' runs 'index' or "
           "'dropless' per expert shard; pick one, or expert_parallel='gspmd'.")
    _check(0 <= e.num_hash_layers <= num_layers, f"{p}.num_hash_layers", e.num_hash_layers,
           f"must be between 0 and num_layers={num_layers}.")
    for name in ("swiglu_limit", "balance_loss_coef", "z_loss_coef", "bias_update_rate",
                 "routed_scaling_factor"):
        _check(getattr(e, name) >= 0, f"{p}.{name}", getattr(e, name), "must be >= 0.")


def validate_v4(c: V4Config, prefix: str = "model") -> None:
    """Checks every field; raises ValueError naming the field, the value and the fix."""
    _check(c.architecture == "deepseek_v4", f"{prefix}.architecture", c.architecture,
           "a V4Config is architecture='deepseek_v4'.")
    _positive(c, prefix, ("vocab_size", "embed_dim", "num_layers", "max_seq_len", "norm_eps",
                          "init_std"))
    _check(c.dtype in DTYPES, f"{prefix}.dtype", c.dtype, f"use one of {list(DTYPES)}.")
    _check(c.param_dtype in DTYPES, f"{prefix}.param_dtype", c.param_dtype,
           f"use one of {list(DTYPES)}.")
    _check(c.remat_policy in REMAT_POLICIES, f"{prefix}.remat_policy", c.remat_policy,
           f"use one of {list(REMAT_POLICIES)}.")
    validate_attention(c.attention, c.num_layers, f"{prefix}.attention")
    validate_moe(c.moe, c.num_layers, f"{prefix}.moe")
    _positive(c.hc, f"{prefix}.hc", ("hc_mult", "sinkhorn_iters"))
    _check(c.hc.eps >= 0, f"{prefix}.hc.eps", c.hc.eps, "must be >= 0.")
    _check(c.mtp.depth in (0, 1), f"{prefix}.mtp.depth", c.mtp.depth, "must be 0 (off) or 1.")
    _check(c.mtp.loss_weight >= 0, f"{prefix}.mtp.loss_weight", c.mtp.loss_weight,
           "must be >= 0.")
    _check(c.mtp.layer_type in LAYER_TYPES, f"{prefix}.mtp.layer_type", c.mtp.layer_type,
           f"use one of {list(LAYER_TYPES)}.")


def v4_config(section: Any, prefix: str = "model") -> V4Config:
    """Builds and validates a V4Config from a dict / ConfigDict (unknown keys raise)."""
    cfg = dataclass_from_dict(V4Config, section, prefix)
    validate_v4(cfg, prefix)
    return cfg


__all__ = ["HyperConfig", "LAYER_TYPES", "V4AttentionConfig", "V4Config", "V4MTPConfig",
           "V4MoEConfig", "layer_types_from_ratios", "v4_config", "validate_v4"]
