"""The model interface: what training, planning and checkpoint conversion ask of a model.

Each model architecture (`model.architecture` of a config) is one `Architecture` record in
`ARCHITECTURES`. Everything outside `moejax/model/` that depends on the architecture —
the train step (balance-bias update rates, extra loss terms), the train state (frozen
variable collections), MFU and `moejax.plan` (FLOPs, parameter counts), the HF command
line (which converter) — asks `architecture_of(model_config)` and never compares
architecture names. Adding an architecture is a sub-package of `moejax/model/` (its
`nn.Module` with the `Transformer` call contract, see docs/architecture.md), its config
section in `moejax/config/`, and one entry here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn

from moejax.config import AnyModelConfig
from moejax.model import counting
from moejax.model.moe.execution import execution_of, log_execution
from moejax.model.mtp import MTP_BIAS
from moejax.model.transformer import Transformer
from moejax.model.v4 import moe as v4_moe
from moejax.model.v4.model import TransformerV4
from moejax.model.v4.plan import plan_v4
from moejax.sharding import active_mesh


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One model family and the answers the rest of moejax needs from it."""
    name: str  # the value of model.architecture
    # (model config, decode) -> the Linen model; `decode` turns on the KV cache.
    module: Callable[[Any, bool], nn.Module]
    # model section (ConfigDict or dataclass), seq_len -> the `moejax.plan.KEYS` figures.
    plan: Callable[[Any, int], dict[str, float]]
    # model config, seq_len -> training FLOPs per token (MFU).
    flops_per_token: Callable[[Any, int], float]
    # model config -> {moe_bias variable: update rate (scalar or rows broadcast to it)}.
    bias_update_rates: Callable[[Any], dict[str, Any]]
    # variable collections that are part of the model but never change after init
    # (saved in checkpoints, no gradient, no optimizer state).
    frozen_collections: tuple[str, ...] = ()
    # aux entries of the model's forward that are added to the loss as they are (already
    # weighted) and logged under their name.
    extra_losses: tuple[str, ...] = ()
    # HF `config.json` model_type that `moejax.interop` converts this architecture to/from.
    hf_model_type: str = ""


def uniform_bias_update_rates(m: Any) -> dict[str, Any]:
    """Every balance bias (main model and MTP) moves at model.moe.bias_update_rate."""
    rate = m.moe.bias_update_rate
    return {"bias": rate, MTP_BIAS: rate}


def _plan_flops(plan: Callable[[Any, int], dict[str, float]]) -> Callable[[Any, int], float]:
    return lambda m, seq_len: float(plan(m, seq_len)["flops_per_token"])


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture(
        name="transformer",  # DeepSeekMoE decoder: dense / MoE, GQA or MLA (DeepSeek-V2/V3)
        module=lambda m, decode: Transformer(m, decode=decode),
        plan=counting.plan_transformer,
        flops_per_token=counting.transformer_flops_per_token,
        bias_update_rates=uniform_bias_update_rates,
        hf_model_type="deepseek_v3"),
    Architecture(
        name="deepseek_v4",
        module=lambda m, decode: TransformerV4(m, decode=decode),
        plan=plan_v4,
        flops_per_token=_plan_flops(plan_v4),  # compressed-attention keys per layer type
        bias_update_rates=v4_moe.bias_update_rates,
        frozen_collections=(v4_moe.HASH_COLLECTION,),
        extra_losses=("indexer_loss",),
        hf_model_type="deepseek_v4"),
)}
# Every architecture's frozen collections (a model without one simply has none).
FROZEN_COLLECTIONS = tuple(sorted({c for a in ARCHITECTURES.values()
                                   for c in a.frozen_collections}))


def architecture_of(m: Any) -> Architecture:
    """The `Architecture` of a model config or model section (ConfigDict / dataclass)."""
    name = getattr(m, "architecture", "transformer")
    if name not in ARCHITECTURES:
        raise ValueError(f"model.architecture={name!r} is not one of {sorted(ARCHITECTURES)}; "
                         "fix the model section of the config.")
    return ARCHITECTURES[name]


def build_model(m: AnyModelConfig, decode: bool = False) -> nn.Module:
    """The Linen model of a model config (`moejax.Transformer`, `moejax.TransformerV4`,
    ...); `decode` turns on the KV cache (one call per new token).

    The MoE layers' platform choices ("auto" expert_parallel / transport / backend) are
    resolved for the active mesh (`sharding.use_mesh`; none: one device), validated
    (ValueError naming the field) and logged here (model/moe/execution.py)."""
    arch = architecture_of(m)
    if getattr(m, "num_moe_layers", 1):
        log_execution(execution_of(m.moe, active_mesh()))
    return arch.module(m, decode)


def drop_free(m: AnyModelConfig) -> AnyModelConfig:
    """The same model with unlimited expert capacity (decode steps have too few tokens per
    group for a capacity to mean anything)."""
    return dataclasses.replace(m, moe=dataclasses.replace(m.moe, capacity_factor=0.0))
