"""moejax: train DeepSeek-class Mixture-of-Experts language models in JAX.

Train and evaluate (what `moejax-train` / `moejax-eval` run)::

    cfg = moejax.load_config("tiny", overrides=["train.steps=100"])  # or a file path
    final = moejax.train_and_evaluate(cfg, "runs/tiny")   # last metrics, validation
    result = moejax.evaluate(cfg, "runs/tiny")            # also writes runs/tiny/eval.json

Model API::

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
from moejax.train import train_and_evaluate
from moejax.eval import evaluate

__all__ = ["Config", "MeshConfig", "ModelConfig", "MoEConfig", "Transformer",
           "TransformerV4", "V4Config", "build_model", "evaluate", "init_variables",
           "load_config", "make_mesh", "model_config", "resolve", "train_and_evaluate",
           "update_balance_bias", "use_mesh"]
