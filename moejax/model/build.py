"""The model a config describes: `moejax.Transformer` or `moejax.TransformerV4`.

Everything that builds a model from an experiment (training state, evaluation, generation,
benchmarks) goes through `build_model`, so a new architecture is added here once.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn

from moejax.config import AnyModelConfig
from moejax.model.transformer import Transformer
from moejax.model.v4.model import TransformerV4


def build_model(m: AnyModelConfig, decode: bool = False) -> nn.Module:
    """`TransformerV4` for architecture "deepseek_v4", else `Transformer`; `decode` turns
    on the KV cache (one call per new token)."""
    if m.architecture == "deepseek_v4":
        return TransformerV4(m, decode=decode)
    return Transformer(m, decode=decode)


def drop_free(m: AnyModelConfig) -> AnyModelConfig:
    """The same model with unlimited expert capacity (decode steps have too few tokens per
    group for a capacity to mean anything)."""
    return dataclasses.replace(m, moe=dataclasses.replace(m.moe, capacity_factor=0.0))
