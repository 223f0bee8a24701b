"""HuggingFace DeepSeek-V3 checkpoints <-> moejax.

    config, variables = hf.load("path/to/DeepSeek-V3")        # config.json + safetensors
    logits, aux = moejax.Transformer(moejax.model_config(config.model)).apply(variables, ids)
    hf.save(config, variables, "out/")                          # from_pretrained loads it

`load` accepts HF in-memory names (fused experts), `save_pretrained` names and the released
checkpoint (unfused experts, FP8 e4m3 with 128x128 `weight_scale_inv`, MTP at layer
`num_hidden_layers`); see hf_names.py. Tensors are read one at a time (memory-mapped) and
written into preallocated arrays, so host memory holds the model once plus one tensor
(the simple reference; `hf_stream` imports full sizes slice by slice onto a mesh).
The imported model is dropless (`model.moe.capacity_factor = 0`), like HF.

Command line (see `python -m moejax.interop --help`):
    import --hf-dir DIR --workdir W   Orbax checkpoint that `train.py --workdir W` resumes
    export --workdir W --out DIR      the newest checkpoint of W as a HF folder
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax.config import (DataConfig, MeshConfig, ModelConfig, OptimizerConfig, TrainConfig,
                           model_config)
from moejax.interop import hf_config
from moejax.interop.host_view import host_views, to_numpy
from moejax.interop.hf_names import MTP_DUPLICATES, import_writes, layer_tensors
from moejax.interop.safetensors_io import SCALE_SUFFIX, CheckpointReader, ShardedWriter
from moejax.model.transformer import Transformer

ConfigDict = ml_collections.ConfigDict


def config_dict(model: ModelConfig, tokenizer: str = "byte") -> ConfigDict:
    """A full moejax ConfigDict: this model section plus default mesh/data/train/optimizer."""
    data = dataclasses.asdict(DataConfig())
    data["tokenizer"] = tokenizer
    return ConfigDict({
        "model": dataclasses.asdict(model), "mesh": dataclasses.asdict(MeshConfig()),
        "data": data, "train": dataclasses.asdict(TrainConfig()),
        "optimizer": dataclasses.asdict(OptimizerConfig())})


def read_config(hf_dir: str | pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; `hf_dir` must be a HuggingFace model folder.")
    return json.loads(path.read_text())


class _Buffers:
    """Preallocated host arrays of the variables, filled piece by piece, with coverage."""

    def __init__(self, abstract: Any) -> None:
        flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
        self.shapes = {tuple(k.key for k in path): leaf for path, leaf in flat}
        self.arrays: dict[tuple[str, ...], np.ndarray] = {}
        self.written: dict[tuple[str, ...], int] = {}

    def write(self, path: tuple[str, ...], index: tuple[int, ...], value: np.ndarray,
              name: str) -> None:
        if path not in self.shapes:
            raise ValueError(f"{name}: no moejax variable {'/'.join(path)} in this config.")
        spec = self.shapes[path]
        if path not in self.arrays:
            self.arrays[path] = np.empty(spec.shape, np.dtype(spec.dtype))
        target = self.arrays[path][index] if index else self.arrays[path]
        if target.shape != value.shape:
            raise ValueError(f"{name}: shape {value.shape} (moejax layout) does not fit "
                             f"{'/'.join(path)}{list(index)} of shape {target.shape}; "
                             "config.json and the tensors disagree.")
        target[...] = value
        self.written[path] = self.written.get(path, 0) + value.size

    def finish(self) -> dict[str, Any]:
        """Checks every element was written exactly once; returns the jax variables."""
        bad = [f"{'/'.join(p)} ({self.written.get(p, 0)} of {int(np.prod(s.shape))} values)"
               for p, s in self.shapes.items()
               if self.written.get(p, 0) != int(np.prod(s.shape))]
        if bad:
            raise ValueError("checkpoint does not fill the model exactly (missing or "
                             f"duplicated tensors): {', '.join(bad[:8])}"
                             f"{' ...' if len(bad) > 8 else ''}")
        out: dict[str, Any] = {}
        for path in list(self.shapes):
            node = out
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = jnp.asarray(self.arrays.pop(path))  # frees the host copy
        return out


def abstract_variables(m: ModelConfig) -> Any:
    """Shapes and dtypes of the model's variables (nothing allocated)."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    return nn.unbox(jax.eval_shape(Transformer(m).init, jax.random.key(0), tokens))


def tokenizer_of(hf_dir: str | pathlib.Path) -> str:
    """The folder's tokenizer.json (absolute path), else the byte tokenizer."""
    tokenizer = pathlib.Path(hf_dir) / "tokenizer.json"
    return str(tokenizer.absolute()) if tokenizer.is_file() else "byte"


def describe(hf_dir: str | pathlib.Path, names: list[str], dtype: str
             ) -> tuple[ModelConfig, Callable[[str], bool], tuple[int, int]]:
    """(moejax model of the checkpoint, which tensor names carry no weight of their own
    (FP8 scales, the MTP layer's copies of embed / head), FP8 block rows x columns)."""
    hf = read_config(hf_dir)
    mtp_prefix = f"model.layers.{hf.get('num_hidden_layers')}."
    has_mtp = any(n.startswith(mtp_prefix) for n in names)
    model = hf_config.model_from_hf(hf, mtp_depth=1 if has_mtp else 0, param_dtype=dtype)
    block = tuple(hf.get("quantization_config", {}).get("weight_block_size", (128, 128)))

    def skip(name: str) -> bool:
        return name.endswith(SCALE_SUFFIX) or (name.startswith(mtp_prefix) and
                                               name[len(mtp_prefix):] in MTP_DUPLICATES)
    return model, skip, block


def load(hf_dir: str | pathlib.Path, dtype: str = "float32"
         ) -> tuple[ConfigDict, dict[str, Any]]:
    """Imports a `deepseek_v3` HF checkpoint: (moejax ConfigDict, variables).

    `dtype` is the storage dtype of the returned parameters (the balance biases stay fp32).
    Raises ValueError for other model types, unknown tensor names or an incomplete model.
    """
    hf_dir = pathlib.Path(hf_dir)
    reader = CheckpointReader(hf_dir)
    model, skip, block = describe(hf_dir, reader.names(), dtype)
    cfg = config_dict(model, tokenizer_of(hf_dir))
    buffers = _Buffers(abstract_variables(model))
    unknown = []
    for names in reader.by_file().values():
        for name in names:
            if skip(name):
                continue
            try:
                writes = import_writes(name, reader.read_float(name, block), model)
            except KeyError:
                unknown.append(name)
                continue
            for w in writes:
                buffers.write(w.path, w.index, w.value, name)
    reader.close()
    if unknown:
        raise ValueError(f"{len(unknown)} tensor name(s) of {hf_dir} are not DeepSeek-V3 "
                         f"weights moejax knows: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    return cfg, buffers.finish()


def _numpy(x: Any, dtype: np.dtype | None) -> np.ndarray:
    a = to_numpy(x)
    return a.astype(dtype) if dtype is not None and a.dtype != dtype else a


def _layer_params(m: ModelConfig, params: dict[str, Any], layer: int) -> dict[str, Any]:
    stack = "dense_stack" if layer < m.num_dense_layers else "moe_stack"
    i = layer if layer < m.num_dense_layers else layer - m.num_dense_layers
    return (jax.tree.map(lambda a: a[i], params[stack]["layers"]) if m.scan_layers
            else params[stack][f"layers_{i}"])  # HostViews: copied tensor by tensor


def save(config: Any, variables: dict[str, Any], out_dir: str | pathlib.Path,
         dtype: str | None = None, max_shard_bytes: int = 4 << 30, write: bool = True) -> None:
    """Writes `variables` as a HF `deepseek_v3` folder (config.json + safetensors).

    `config`: a ConfigDict with a model section, or a ModelConfig. `dtype` converts the
    weights (e.g. "bfloat16"); the router and its correction bias stay fp32 as in HF.
    Variables may be numpy or (sharded, multi-process) jax.Arrays: they are copied to the
    host one tensor at a time (host_view.py). With several processes every process calls
    `save` and only the one with `write` True writes.
    """
    m = config if isinstance(config, ModelConfig) else model_config(config.model)
    hf = hf_config.hf_from_model(m, dtype or m.param_dtype)
    np_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    params = host_views(variables["params"])
    biases = host_views(variables.get("moe_bias", {}))
    writer = ShardedWriter(out_dir, max_shard_bytes, enabled=write)

    def put(name: str, value: Any) -> None:
        fp32 = name.endswith(("mlp.gate.weight", "e_score_correction_bias"))
        writer.add(name, _numpy(value, np.dtype(np.float32) if fp32 else np_dtype))

    put("model.embed_tokens.weight", params["embed"]["embedding"])
    for layer in range(m.num_layers):
        moe_row = layer - m.num_dense_layers
        bias = biases["bias"][moe_row] if moe_row >= 0 else None
        for suffix, value in layer_tensors(_layer_params(m, params, layer), bias):
            put(f"model.layers.{layer}.{suffix}", value)
    if m.mtp.depth:
        mtp, prefix = params["mtp"], f"model.layers.{m.num_layers}."
        for suffix, value in layer_tensors(mtp["block"], biases["mtp_bias"][0]):
            put(prefix + suffix, value)
        put(prefix + "enorm.weight", mtp["enorm"]["scale"])
        put(prefix + "hnorm.weight", mtp["hnorm"]["scale"])
        put(prefix + "eh_proj.weight", np.asarray(mtp["eh_proj"]).T)
        put(prefix + "shared_head.norm.weight", mtp["norm"]["scale"])
        put(prefix + "embed_tokens.weight", params["embed"]["embedding"])  # as released
        if not m.tie_embeddings:
            put(prefix + "shared_head.head.weight", np.asarray(params["head"]["kernel"]).T)
    put("model.norm.weight", params["final_norm"]["scale"])
    if not m.tie_embeddings:
        put("lm_head.weight", np.asarray(params["head"]["kernel"]).T)
    writer.close()
    if write:
        (pathlib.Path(out_dir) / "config.json").write_text(json.dumps(hf, indent=2))

