"""Dense twin of configs/tiny.py: same everything, every layer dense, same active FLOPs/token.

Matrix FLOPs per token are 2 * (weights the token passes through), so equal active FLOPs
means equal active FFN weights summed over the layers (attention and the LM head are the
same in both models). With D = embed_dim, F = expert_hidden, T = top_k, S = shared experts,
E = experts, L = num_layers, Ld = num_dense_layers of tiny:

    tiny dense layer    3 * D * mlp_hidden                        (SwiGLU: gate, up, down)
    tiny MoE layer      3 * D * F * (T + S)  +  D * E             (experts + router)
    baseline layer      3 * D * h

    L * h = Ld * mlp_hidden + (L - Ld) * (F * (T + S) + E / 3)

With tiny's values (D=128, mlp_hidden=384, F=96, T=2, S=1, E=8, L=4, Ld=1):

    4 * h = 384 + 3 * (288 + 8/3) = 1256   ->   h = 314 (exact)

`get_config` computes h from tiny's config, so this file follows any change to tiny.py
(rounded to the nearest integer when the division is not exact).
"""
import importlib.util
import pathlib

import ml_collections


def _tiny() -> ml_collections.ConfigDict:
    path = pathlib.Path(__file__).with_name("tiny.py")
    spec = importlib.util.spec_from_file_location("_moejax_configs_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def dense_hidden(model: ml_collections.ConfigDict) -> int:
    """The dense FFN width h that matches the MoE model's active FFN FLOPs (see above)."""
    moe = model.moe
    num_moe = model.num_layers - model.num_dense_layers
    moe_width = moe.expert_hidden * (moe.top_k + moe.num_shared_experts) + moe.num_experts / 3
    total = model.num_dense_layers * model.mlp_hidden + num_moe * moe_width
    return round(total / model.num_layers)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    cfg = _tiny()
    cfg.model.mlp_hidden = dense_hidden(cfg.model)  # 314 for tiny: equal active FLOPs
    cfg.model.num_dense_layers = cfg.model.num_layers  # every layer dense (the moe section is unused)
    return cfg
