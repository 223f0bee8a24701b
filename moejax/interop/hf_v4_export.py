"""`TransformerV4` variables -> a HuggingFace DeepSeek-V4 folder (the inverse of hf_v4.load).

    hf_v4.save(cfg, variables, "out/")     # config.json + safetensors (sharded + index)
    DeepseekV4ForCausalLM.from_pretrained("out/")

Tensor names are the ones `save_pretrained` writes (the third naming of
docs/deepseek_v3_v4.md, "Checkpoint names and formats": HF's conversion mapping
reverse-applied): `model.layers.{l}.attn.wq_a.weight`, `attn.norm.weight` (the attention
kv_norm), `ffn.experts.{e}.w1/w2/w3.weight` (one tensor per expert),
`hc_attn_fn`, `head.weight`, `model.hc_head.hc_fn`, ... `from_pretrained` renames them to
its in-memory names; `hf_v4.load` reads them back. Besides `params`:

* `moe_bias/bias` [L, E] -> `ffn.gate.bias` of every learned (non-hash) layer
  (HF's `e_score_correction_bias` buffer); the rows of hash layers are unused and dropped;
* `hash_routing/.../tid2eid` [V, k] int32 -> `ffn.gate.tid2eid` int64 of every hash layer;
* an MTP block -> DeepSeek's original `mtp.0.*` names (HF ignores them on load;
  `hf_v4.load` imports them) with `moe_bias/mtp_bias` as `mtp.0.ffn.gate.bias`.

Layers are read one at a time through `v4.layer_location` (scanned or unrolled stacks), so
the host holds one layer plus one shard beyond the model. `dtype` converts the weights;
the tensors HF keeps in fp32 stay fp32 (norm weights, mHC / hyper-head, sinks, position
biases, the correction bias), tid2eid stays integer.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Iterator

import jax
import numpy as np

from moejax.interop.hf_v4_config import hf_from_v4
from moejax.interop.host_view import host_views
from moejax.interop.safetensors_io import ShardedWriter
from moejax.model.v4.model import layer_location
from moejax.config.v4 import V4Config, v4_config

Inverse = Callable[[np.ndarray], np.ndarray]  # moejax layout -> torch [out, in] layout
_T: Inverse = lambda w: w.T  # noqa: E731
_I: Inverse = lambda w: w  # noqa: E731


def _per_head(w: np.ndarray) -> np.ndarray:  # [in, H, K] -> [H*K, in]
    return w.reshape(w.shape[0], -1).T


def _o_a(w: np.ndarray) -> np.ndarray:  # [g, in, r] -> [g*r, in] (group-major rows)
    return w.transpose(0, 2, 1).reshape(-1, w.shape[1])


def _o_b(w: np.ndarray) -> np.ndarray:  # [g, r, D] -> [D, g*r]
    return w.reshape(-1, w.shape[-1]).T


# moejax path inside a block -> save_pretrained suffix inside `model.layers.{l}.`.
BLOCK_EXPORT: list[tuple[tuple[str, ...], str, Inverse]] = [
    (("attention", "q_a"), "attn.wq_a.weight", _T),
    (("attention", "q_norm", "scale"), "attn.q_norm.weight", _I),
    (("attention", "q_b"), "attn.wq_b.weight", _per_head),
    (("attention", "kv"), "attn.wkv.weight", _T),
    (("attention", "kv_norm", "scale"), "attn.norm.weight", _I),
    (("attention", "o_a"), "attn.wo_a.weight", _o_a),
    (("attention", "o_b"), "attn.wo_b.weight", _o_b),
    (("attention", "sinks"), "attn.attn_sink", _I),
    (("attention", "compressor", "kv_proj"), "attn.compressor.wkv.weight", _T),
    (("attention", "compressor", "gate_proj"), "attn.compressor.wgate.weight", _T),
    (("attention", "compressor", "position_bias"), "attn.compressor.ape", _I),
    (("attention", "compressor", "kv_norm", "scale"), "attn.compressor.norm.weight", _I),
    (("attention", "indexer", "compressor", "kv_proj"),
     "attn.indexer.compressor.wkv.weight", _T),
    (("attention", "indexer", "compressor", "gate_proj"),
     "attn.indexer.compressor.wgate.weight", _T),
    (("attention", "indexer", "compressor", "position_bias"), "attn.indexer.compressor.ape",
     _I),
    (("attention", "indexer", "compressor", "kv_norm", "scale"),
     "attn.indexer.compressor.norm.weight", _I),
    (("attention", "indexer", "q_b"), "attn.indexer.wq_b.weight", _per_head),
    (("attention", "indexer", "weights_proj"), "attn.indexer.weights_proj.weight", _T),
    (("moe", "router", "kernel"), "ffn.gate.weight", _T),
    (("moe", "shared", "gate"), "ffn.shared_experts.w1.weight", _T),
    (("moe", "shared", "up"), "ffn.shared_experts.w3.weight", _T),
    (("moe", "shared", "down"), "ffn.shared_experts.w2.weight", _T),
    (("attn_norm", "scale"), "attn_norm.weight", _I),
    (("ffn_norm", "scale"), "ffn_norm.weight", _I),
    (("attn_hc", "fn"), "hc_attn_fn", _T), (("attn_hc", "base"), "hc_attn_base", _I),
    (("attn_hc", "scale"), "hc_attn_scale", _I), (("ffn_hc", "fn"), "hc_ffn_fn", _T),
    (("ffn_hc", "base"), "hc_ffn_base", _I), (("ffn_hc", "scale"), "hc_ffn_scale", _I),
]
EXPERT_EXPORT = (("gate", "w1"), ("up", "w3"), ("down", "w2"))  # moejax leaf, DeepSeek name
# Top-level params -> save_pretrained name.
TOP_EXPORT: list[tuple[tuple[str, ...], str, Inverse]] = [
    (("embed", "embedding"), "model.embed_tokens.weight", _I),
    (("hc_head", "fn"), "model.hc_head.hc_fn", _T),
    (("hc_head", "base"), "model.hc_head.hc_base", _I),
    (("hc_head", "scale"), "model.hc_head.hc_scale", _I),
    (("final_norm", "scale"), "model.norm.weight", _I),
    (("head", "kernel"), "head.weight", _T),
]
# MTP-only params -> DeepSeek's original names.
MTP_EXPORT: list[tuple[tuple[str, ...], str, Inverse]] = [
    (("e_proj",), "mtp.0.e_proj.weight", _T), (("h_proj",), "mtp.0.h_proj.weight", _T),
    (("enorm", "scale"), "mtp.0.enorm.weight", _I),
    (("hnorm", "scale"), "mtp.0.hnorm.weight", _I),
    (("norm", "scale"), "mtp.0.norm.weight", _I),
    (("hc_head", "fn"), "mtp.0.hc_head_fn", _T), (("hc_head", "base"), "mtp.0.hc_head_base", _I),
    (("hc_head", "scale"), "mtp.0.hc_head_scale", _I),
]
_FP32_SUFFIXES = ("norm.weight", "attn_sink", ".ape", "gate.bias", "hc_attn_fn", "hc_attn_base",
                  "hc_attn_scale", "hc_ffn_fn", "hc_ffn_base", "hc_ffn_scale", "hc_fn",
                  "hc_base", "hc_scale", "hc_head_fn", "hc_head_base", "hc_head_scale")


def _get(tree: Any, path: tuple[str, ...]) -> Any | None:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def block_tensors(p: dict[str, Any], bias: np.ndarray | None, tid2eid: np.ndarray | None
                  ) -> Iterator[tuple[str, np.ndarray]]:
    """(save_pretrained suffix, torch-layout array) of one block's host parameters `p`.

    `bias` [E] is written for a learned layer, `tid2eid` [V, k] for a hash layer (one of the
    two). Keys absent from `p` (a sliding layer's compressor, an HCA layer's indexer) are
    skipped.
    """
    for path, suffix, inverse in BLOCK_EXPORT:
        value = _get(p, path)
        if value is not None:
            yield suffix, inverse(np.asarray(value))
    moe = p["moe"]
    for e in range(np.shape(moe["gate"])[0]):
        for leaf, name in EXPERT_EXPORT:
            yield f"ffn.experts.{e}.{name}.weight", np.asarray(moe[leaf][e]).T
    if tid2eid is not None:
        yield "ffn.gate.tid2eid", np.asarray(tid2eid).astype(np.int64)
    elif bias is not None:
        yield "ffn.gate.bias", np.asarray(bias, np.float32)


def _layer(cfg: V4Config, tree: Any, layer: int) -> Any:
    """Layer `layer`'s subtree of a collection's `layers` node, on the host."""
    where, rep = layer_location(cfg, layer)
    node = _get(tree, where)
    if node is None:
        return None
    if rep is not None:
        node = jax.tree.map(lambda a: a[rep], node)
    return node


def export_tensors(cfg: V4Config, variables: dict[str, Any]
                   ) -> Iterator[tuple[str, np.ndarray]]:
    """Every (save_pretrained name, array) of `variables`, one layer at a time."""
    variables = host_views(variables)  # copied to the host tensor by tensor
    params = variables["params"]
    biases = variables.get("moe_bias", {})
    tables = variables.get("hash_routing", {}).get("layers", {})
    for path, name, inverse in TOP_EXPORT[:4]:
        yield name, inverse(np.asarray(_get(params, path)))
    bias_rows = np.asarray(biases["bias"]) if "bias" in biases else None
    for layer in range(cfg.num_layers):
        hashed = cfg.is_hash(layer)
        table = _get(_layer(cfg, tables, layer), ("moe", "router", "tid2eid")) if hashed else None
        if hashed and table is None:
            raise ValueError(f"layer {layer} is hash-routed but variables['hash_routing'] has "
                             "no tid2eid table for it; pass the model's full variables.")
        bias = None if hashed or bias_rows is None else bias_rows[layer]
        for suffix, value in block_tensors(_layer(cfg, params["layers"], layer), bias, table):
            yield f"model.layers.{layer}.{suffix}", value
    for path, name, inverse in TOP_EXPORT[4:]:
        yield name, inverse(np.asarray(_get(params, path)))
    if cfg.mtp.depth:
        mtp = params["mtp"]
        for path, name, inverse in MTP_EXPORT:
            yield name, inverse(np.asarray(_get(mtp, path)))
        mtp_bias = biases.get("mtp_bias")
        mtp_bias = None if mtp_bias is None else np.asarray(mtp_bias)[0]
        for suffix, value in block_tensors(mtp["block"], mtp_bias, None):
            yield f"mtp.0.{suffix}", value


def save(config: Any, variables: dict[str, Any], out_dir: str | pathlib.Path,
         dtype: str | None = None, max_shard_bytes: int = 4 << 30, write: bool = True) -> None:
    """Writes `variables` of `TransformerV4(cfg)` as a HF `deepseek_v4` folder.

    `config`: a V4Config, or a ConfigDict / Config whose `model` section is one. `dtype`
    converts the weights (e.g. "bfloat16"); fp32-kept tensors stay fp32 (module docstring).
    Sharded / multi-process jax.Arrays are copied to the host one tensor at a time; with
    several processes every process calls `save` and only the one with `write` writes.
    """
    cfg = config if isinstance(config, V4Config) else v4_config(config.model)
    hf = hf_from_v4(cfg, dtype or cfg.param_dtype)
    target = None if dtype is None else np.dtype(jax.numpy.dtype(dtype))
    writer = ShardedWriter(out_dir, max_shard_bytes, enabled=write)
    for name, value in export_tensors(cfg, variables):
        if value.dtype.kind == "f":
            keep32 = name.endswith(_FP32_SUFFIXES)
            want = np.dtype(np.float32) if keep32 else target
            value = value.astype(want) if want is not None and value.dtype != want else value
        writer.add(name, value)
    writer.close()
    if write:
        (pathlib.Path(out_dir) / "config.json").write_text(json.dumps(hf, indent=2))
