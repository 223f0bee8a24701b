"""DeepSeek-V4 checkpoints -> `TransformerV4` variables (spec section 3.1).

Three namings are accepted, in any mix (`canonical_name` maps each to HF's in-memory name
without the `model.` prefix, using HF's own V4 conversion renames):

1. DeepSeek's original checkpoint: `layers.3.attn.wq_a.weight` (+ `.scale`), per-expert
   `ffn.experts.{e}.w1/w2/w3.weight`, `hc_attn_fn`, `mtp.0.*`, FP8 / FP4 weights;
2. HF in-memory (`model.state_dict()`): `model.layers.3.self_attn.q_a_proj.weight`, fused
   `mlp.experts.gate_up_proj [E, 2I, D]` (gate rows first), `mlp.experts.down_proj`;
3. HF `save_pretrained`'s hybrid: `model.layers.3.attn.wq_a.weight`, `head.weight`, ...

Dequantisation on load: an FP8 e4m3 weight with a `.scale` (e8m0, 128x128 blocks) or
`.weight_scale_inv` (fp32) beside it; an int8 expert weight [out, in/2] is FP4 e2m1 packed
two per byte (low nibble first) with an e8m0 scale per 32 input columns. e8m0 scales given
as raw uint8 bytes mean 2^(b - 127); float scales multiply directly.

Export (`save`, the inverse, in hf_v4_export.py) writes the `save_pretrained` naming (3)
and a config.json that `DeepseekV4ForCausalLM.from_pretrained` loads.

Layout: torch Linear weights are [out, in]; moejax kernels [in, out], split per head
(q_b [dq, H, dh]) or per group (o_a [g, H/g*dh, r], o_b [g, r, D]). Layers are placed by
`v4.layer_location` (works for unrolled and scanned stacks).
"""
from __future__ import annotations

import json
import pathlib
import re
import struct
from typing import Any, Callable, Container, Iterable, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np

from moejax.interop.hf_v4_config import v4_config_from_hf
from moejax.interop.hf_v4_export import save  # noqa: F401  (hf_v4.save, as hf.save for V3)
from moejax.model.v4.model import TransformerV4, layer_location
from moejax.config.v4 import V4Config

# HF's `conversion_mapping["deepseek_v4"]` renames (original -> in-memory), in order.
_RENAMES = [(re.compile(a), b) for a, b in [
    (r"\.attn\.", ".self_attn."), (r"\.ffn\.", ".mlp."),
    (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"^embed\.weight", "embed_tokens.weight"), (r"^head\.weight", "lm_head.weight"),
    (r"^hc_head_fn", "hc_head.hc_fn"), (r"^hc_head_base", "hc_head.hc_base"),
    (r"^hc_head_scale", "hc_head.hc_scale"),
    (r"\.attn_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_attn_fn", ".attn_hc.fn"), (r"\.hc_attn_base", ".attn_hc.base"),
    (r"\.hc_attn_scale", ".attn_hc.scale"), (r"\.hc_ffn_fn", ".ffn_hc.fn"),
    (r"\.hc_ffn_base", ".ffn_hc.base"), (r"\.hc_ffn_scale", ".ffn_hc.scale"),
    (r"\.attn_sink", ".sinks"),
    (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."),
    (r"\.norm\.", ".kv_norm."), (r"\.ape", ".position_bias"), (r"\.wq_a\.", ".q_a_proj."),
    (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."), (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."), (r"\.wo_a\.", ".o_a_proj."), (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."), (r"\.gate\.bias", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
]]
_MTP_TOP = re.compile(r"^mtp\.0\.(e_proj\.weight|h_proj\.weight|enorm\.weight|hnorm\.weight|"
                      r"norm\.weight|hc_head_fn|hc_head_base|hc_head_scale)$")
_BLOCK = re.compile(r"^(layers\.(\d+)|mtp\.0)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
FP4_TABLE = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def canonical_name(name: str) -> str:
    """Any of the three namings -> HF in-memory name without the `model.` prefix."""
    name = name[len("model."):] if name.startswith("model.") else name
    if _MTP_TOP.match(name):
        return name
    for pattern, target in _RENAMES:
        name = pattern.sub(target, name)
    return name


# ----------------------------------------------------------------------------- dequantise

def e8m0_to_float(scale: np.ndarray) -> np.ndarray:
    """Raw e8m0 bytes (uint8) -> 2^(b - 127); float scales pass through."""
    if scale.dtype == np.uint8:
        return np.ldexp(np.float32(1), scale.astype(np.int32) - 127).astype(np.float32)
    return scale.astype(np.float32)


def dequantize_fp8(q: np.ndarray, scale: np.ndarray, block: int = 128) -> np.ndarray:
    """W[i, j] = q[i, j] * s[i // block, j // block] (ragged edge blocks allowed)."""
    s = e8m0_to_float(scale)
    full = np.repeat(np.repeat(s, block, 0), block, 1)[:q.shape[0], :q.shape[1]]
    return q.astype(np.float32) * full


def dequantize_fp4(packed: np.ndarray, scale: np.ndarray, block: int = 32) -> np.ndarray:
    """int8 [out, in/2] e2m1 pairs (low nibble = even column) x e8m0 [out, in/32] scales."""
    raw = packed.view(np.uint8)
    values = np.stack([FP4_TABLE[raw & 0xF], FP4_TABLE[raw >> 4]], -1)
    values = values.reshape(packed.shape[0], -1)
    return values * np.repeat(e8m0_to_float(scale), block, 1)[:, :values.shape[1]]


def dequantize(weight: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """fp32 weight from whatever storage (FP8 + block scale, FP4 + group scale, float)."""
    if scale is None:
        return np.asarray(weight, np.float32) if weight.dtype != np.int64 else weight
    if weight.dtype in (np.int8, np.uint8):
        return dequantize_fp4(weight, scale)
    return dequantize_fp8(weight, scale)


def is_scale_of_weight(name: str, tensors: Container[str]) -> bool:
    """`X.scale` / `X.weight_scale_inv` beside an `X.weight` (not e.g. `attn_hc.scale`)."""
    for suffix, weight_suffix in ((".scale", ".weight"), ("_scale_inv", "")):
        if name.endswith(suffix) and name[:-len(suffix)] + weight_suffix in tensors:
            return True
    return False


def dequantized(tensors: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, fp32 weight) of every tensor but the scales, dequantised one at a time (so
    memory-mapped inputs are read lazily: host memory holds one fp32 tensor at a time)."""
    for name, value in tensors.items():
        if is_scale_of_weight(name, tensors):
            continue
        key = scale_name(name, tensors)
        scale = None if key is None else np.asarray(tensors[key])
        yield name, dequantize(np.asarray(value), scale)


def scale_name(name: str, names: Container[str]) -> str | None:
    """The scale tensor beside weight `name` (`.scale`, `_scale_inv`), if any."""
    if not name.endswith(".weight"):
        return None
    stem = name[:-len(".weight")]
    found = None
    for key in (stem + ".scale", name + "_scale_inv", stem + ".weight_scale_inv"):
        if key in names:
            found = key
    return found


# ----------------------------------------------------------------------------- import

Transform = Callable[[np.ndarray, V4Config], np.ndarray]
_T: Transform = lambda w, c: w.T  # noqa: E731
_I: Transform = lambda w, c: w  # noqa: E731


def _q_b(w: np.ndarray, c: V4Config) -> np.ndarray:
    return w.T.reshape(w.shape[1], c.attention.num_heads, -1)


def _index_q_b(w: np.ndarray, c: V4Config) -> np.ndarray:
    return w.T.reshape(w.shape[1], c.attention.index_heads, -1)


def _o_a(w: np.ndarray, c: V4Config) -> np.ndarray:  # [g*r, in] -> [g, in, r]
    return w.reshape(c.attention.o_groups, -1, w.shape[1]).transpose(0, 2, 1)


def _o_b(w: np.ndarray, c: V4Config) -> np.ndarray:  # [D, g*r] -> [g, r, D]
    return w.T.reshape(c.attention.o_groups, -1, w.shape[0])


_A, _C, _X = ("attention",), ("attention", "compressor"), ("attention", "indexer")
BLOCK_RULES: dict[str, tuple[tuple[str, ...], Transform]] = {
    "self_attn.q_a_proj.weight": (_A + ("q_a",), _T),
    "self_attn.q_a_norm.weight": (_A + ("q_norm", "scale"), _I),
    "self_attn.q_b_proj.weight": (_A + ("q_b",), _q_b),
    "self_attn.kv_proj.weight": (_A + ("kv",), _T),
    "self_attn.kv_norm.weight": (_A + ("kv_norm", "scale"), _I),
    "self_attn.o_a_proj.weight": (_A + ("o_a",), _o_a),
    "self_attn.o_b_proj.weight": (_A + ("o_b",), _o_b),
    "self_attn.sinks": (_A + ("sinks",), _I),
    "self_attn.compressor.kv_proj.weight": (_C + ("kv_proj",), _T),
    "self_attn.compressor.gate_proj.weight": (_C + ("gate_proj",), _T),
    "self_attn.compressor.position_bias": (_C + ("position_bias",), _I),
    "self_attn.compressor.kv_norm.weight": (_C + ("kv_norm", "scale"), _I),
    "self_attn.compressor.indexer.kv_proj.weight": (_X + ("compressor", "kv_proj"), _T),
    "self_attn.compressor.indexer.gate_proj.weight": (_X + ("compressor", "gate_proj"), _T),
    "self_attn.compressor.indexer.position_bias": (_X + ("compressor", "position_bias"), _I),
    "self_attn.compressor.indexer.kv_norm.weight": (_X + ("compressor", "kv_norm", "scale"),
                                                    _I),
    "self_attn.compressor.indexer.q_b_proj.weight": (_X + ("q_b",), _index_q_b),
    "self_attn.compressor.indexer.scorer.weights_proj.weight": (_X + ("weights_proj",), _T),
    "mlp.gate.weight": (("moe", "router", "kernel"), _T),
    "mlp.experts.down_proj": (("moe", "down"), lambda w, c: w.transpose(0, 2, 1)),
    "mlp.shared_experts.gate_proj.weight": (("moe", "shared", "gate"), _T),
    "mlp.shared_experts.up_proj.weight": (("moe", "shared", "up"), _T),
    "mlp.shared_experts.down_proj.weight": (("moe", "shared", "down"), _T),
    "input_layernorm.weight": (("attn_norm", "scale"), _I),
    "post_attention_layernorm.weight": (("ffn_norm", "scale"), _I),
    "attn_hc.fn": (("attn_hc", "fn"), _T), "attn_hc.base": (("attn_hc", "base"), _I),
    "attn_hc.scale": (("attn_hc", "scale"), _I), "ffn_hc.fn": (("ffn_hc", "fn"), _T),
    "ffn_hc.base": (("ffn_hc", "base"), _I), "ffn_hc.scale": (("ffn_hc", "scale"), _I),
}
TOP_RULES: dict[str, tuple[tuple[str, ...], Transform]] = {
    "embed_tokens.weight": (("params", "embed", "embedding"), _I),
    "lm_head.weight": (("params", "head", "kernel"), _T),
    "norm.weight": (("params", "final_norm", "scale"), _I),
    "hc_head.hc_fn": (("params", "hc_head", "fn"), _T),
    "hc_head.hc_base": (("params", "hc_head", "base"), _I),
    "hc_head.hc_scale": (("params", "hc_head", "scale"), _I),
    "mtp.0.e_proj.weight": (("params", "mtp", "e_proj"), _T),
    "mtp.0.h_proj.weight": (("params", "mtp", "h_proj"), _T),
    "mtp.0.enorm.weight": (("params", "mtp", "enorm", "scale"), _I),
    "mtp.0.hnorm.weight": (("params", "mtp", "hnorm", "scale"), _I),
    "mtp.0.norm.weight": (("params", "mtp", "norm", "scale"), _I),
    "mtp.0.hc_head_fn": (("params", "mtp", "hc_head", "fn"), _T),
    "mtp.0.hc_head_base": (("params", "mtp", "hc_head", "base"), _I),
    "mtp.0.hc_head_scale": (("params", "mtp", "hc_head", "scale"), _I),
}


def abstract_variables(cfg: V4Config) -> Any:
    """Shapes / dtypes of TransformerV4(cfg)'s variables (nothing allocated)."""
    import flax.linen as nn  # noqa: PLC0415
    tokens = jax.ShapeDtypeStruct((1, 8), np.int32)
    return nn.unbox(jax.eval_shape(TransformerV4(cfg).init, jax.random.key(0), tokens))


class _Buffers:
    """numpy arrays shaped like the model's variables, filled piece by piece."""

    def __init__(self, abstract: Any) -> None:
        self.arrays = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
        self.filled: dict[tuple[str, ...], int] = {}

    def write(self, path: tuple[str, ...], index: tuple[int, ...], value: np.ndarray,
              source: str) -> None:
        node = self.arrays
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise KeyError(f"{source}: the model has no variable {'/'.join(path)}.")
            node = node[key]
        target = node[index] if index else node
        if target.shape != value.shape:
            raise ValueError(f"{source}: shape {value.shape} does not fit {'/'.join(path)}"
                             f"{list(index) if index else ''} of shape {target.shape}.")
        target[...] = value.astype(node.dtype)
        self.filled[path] = self.filled.get(path, 0) + value.size

    def finish(self, allow_missing: Iterable[str] = ()) -> Any:
        missing = []
        for path, leaf in jax.tree_util.tree_leaves_with_path(self.arrays):
            key = tuple(p.key for p in path)
            if self.filled.get(key, 0) < leaf.size and not any(m in "/".join(key)
                                                               for m in allow_missing):
                missing.append("/".join(key))
        if missing:
            raise ValueError(f"{len(missing)} variable(s) not in the checkpoint: {missing[:8]}")
        return self.arrays


def _block_writes(rel: str, w: np.ndarray, cfg: V4Config, where: tuple[str, ...],
                  index: tuple[int, ...], bias_row: tuple[tuple[str, ...], tuple[int, ...]]
                  ) -> list[tuple[tuple[str, ...], tuple[int, ...], np.ndarray]]:
    """Writes of one block tensor (`rel` = canonical name inside the block)."""
    params = ("params",) + where
    if rel in BLOCK_RULES:
        path, fn = BLOCK_RULES[rel]
        return [(params + path, index, fn(w, cfg))]
    if rel == "mlp.gate.e_score_correction_bias":
        return [(bias_row[0], bias_row[1], w)]
    if rel == "mlp.gate.tid2eid":
        return [(("hash_routing",) + where + ("moe", "router", "tid2eid"), index,
                 w.astype(np.int32))]
    if rel == "mlp.experts.gate_up_proj":  # [E, 2I, D], gate rows first
        i = w.shape[1] // 2
        return [(params + ("moe", "gate"), index, w[:, :i].transpose(0, 2, 1)),
                (params + ("moe", "up"), index, w[:, i:].transpose(0, 2, 1))]
    m = _EXPERT.match(rel)
    if m:
        e, which = int(m.group(1)), m.group(2)
        leaf = {"w1": "gate", "w3": "up", "w2": "down"}[which]
        return [(params + ("moe", leaf), index + (e,), w.T)]
    raise KeyError(rel)


def tensor_writes(name: str, w: np.ndarray, cfg: V4Config
                  ) -> list[tuple[tuple[str, ...], tuple[int, ...], np.ndarray]]:
    """(variable path, leading index, value) writes of one (dequantised) tensor."""
    canon = canonical_name(name)
    if canon in TOP_RULES:
        path, fn = TOP_RULES[canon]
        return [(path, (), fn(w, cfg))]
    m = _BLOCK.match(canon)
    if not m:
        raise KeyError(name)
    rel = m.group(3)
    if m.group(2) is None:  # the MTP block
        return _block_writes(rel, w, cfg, ("mtp", "block"), (),
                             (("moe_bias", "mtp_bias"), (0,)))
    layer = int(m.group(2))
    if layer >= cfg.num_layers:
        raise KeyError(name)
    where, rep = layer_location(cfg, layer)
    return _block_writes(rel, w, cfg, ("layers",) + where, () if rep is None else (rep,),
                         (("moe_bias", "bias"), (layer,)))


def import_tensors(tensors: Mapping[str, Any], cfg: V4Config, skip_mtp: bool | None = None,
                   allow_missing: Iterable[str] = ()) -> Any:
    """Checkpoint tensors (any naming, quantised or not) -> TransformerV4 variables (numpy).

    Tensors are dequantised and placed one at a time; with the memory-mapped tensors of
    `read_safetensors` (as `load` passes them) the host holds the model once (in its
    param dtype) plus one fp32 tensor, not a dequantised copy of the whole checkpoint.

    MTP tensors are skipped when the config has no MTP (`skip_mtp` None) or when asked.
    Unknown names raise ValueError; so does any variable the checkpoint leaves unset
    (unless a substring of its path is in `allow_missing`).
    """
    skip_mtp = cfg.mtp.depth == 0 if skip_mtp is None else skip_mtp
    if skip_mtp:
        tensors = {k: v for k, v in tensors.items()
                   if not canonical_name(k).startswith("mtp.")}
    buffers = _Buffers(abstract_variables(cfg))
    buffers.filled[("moe_bias", "bias")] = cfg.moe.num_hash_layers * cfg.moe.num_experts
    unknown = []
    for name, w in dequantized(tensors):
        try:
            writes = tensor_writes(name, w, cfg)
        except KeyError:
            unknown.append(name)
            continue
        for path, index, value in writes:
            buffers.write(path, index, value, name)
    if unknown:
        raise ValueError(f"{len(unknown)} tensor name(s) are not DeepSeek-V4 weights: "
                         f"{unknown[:8]}")
    return buffers.finish(allow_missing)


# ----------------------------------------------------------------------------- files

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
              "F8_E8M0": np.uint8}  # e8m0 kept as raw exponent bytes (see e8m0_to_float)


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file, memory-mapped, as numpy (no torch needed)."""
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    data = np.memmap(path, np.uint8, mode="r", offset=8 + size)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = data[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def load(directory: str | pathlib.Path, **config_overrides: Any) -> tuple[V4Config, Any]:
    """(V4Config, variables) of a V4 checkpoint folder: config.json + *.safetensors."""
    directory = pathlib.Path(directory)
    hf = json.loads((directory / "config.json").read_text())
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(read_safetensors(file))
    cfg = config_of(hf, tensors, **config_overrides)
    return cfg, import_tensors(tensors, cfg)


def config_of(hf: dict[str, Any], names: Iterable[str], **config_overrides: Any) -> V4Config:
    """The V4Config of config.json `hf` for a checkpoint holding tensors `names` (no MTP
    block in the names: MTP depth 0)."""
    if not any(canonical_name(k).startswith("mtp.") for k in names):
        hf = {**hf, "num_nextn_predict_layers": 0}
    return v4_config_from_hf(hf, **config_overrides)
