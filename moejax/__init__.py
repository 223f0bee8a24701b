"""moejax: train DeepSeek-class Mixture-of-Experts language models in JAX.

Notebook API::

    cfg = moejax.load_config("configs/tiny.py", overrides=["model.moe.num_experts=16"])
    model = moejax.build_model(moejax.model_config(cfg.model))  # Transformer / TransformerV4
    mesh = moejax.make_mesh(cfg)
    variables = moejax.init_variables(model, cfg, mesh, jax.random.key(0))
    with moejax.use_mesh(mesh, cfg):
        logits, aux = jax.jit(model.apply)(variables, tokens)

`configs/deepseek_v4.py:tiny` gives a DeepSeek-V4 model (`model.architecture =
"deepseek_v4"`, a `V4Config`); everything else above is unchanged.
"""
from moejax.config import (Config, MeshConfig, ModelConfig, MoEConfig, load_config,
                           model_config, resolve)
from moejax.model.build import build_model
from moejax.model.moe.router import update_balance_bias
from moejax.model.transformer import Transformer
from moejax.model.v4.model import TransformerV4
from moejax.config.v4 import V4Config
from moejax.sharding import init_variables, make_mesh, use_mesh

__all__ = ["Config", "MeshConfig", "ModelConfig", "MoEConfig", "Transformer",
           "TransformerV4", "V4Config", "build_model", "init_variables", "load_config",
           "make_mesh", "model_config", "resolve", "update_balance_bias", "use_mesh"]
