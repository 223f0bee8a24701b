"""Streaming HF import: checkpoint slices straight into sharded `jax.Array`s.

The whole-model import (`hf.load`, `hf_v4.load`) builds every variable in host memory,
which a 671B-parameter model does not fit. Here nothing is built whole:

  1. `plan(hf_dir, dtype)` reads only the safetensors headers. Each tensor name goes
     through the same conversion rules as the whole-model import, applied to a `LazyView`
     (lazy_view.py), giving for every moejax leaf its `Piece`s: a leading index (stacked
     layer, expert) and a view (transposes, splits, slices) of one logical HF tensor;
     `Source`s say how to read and dequantise those tensors (safetensors_slices.py).
  2. `stream(plan, abstract, shardings)` makes each leaf with
     `jax.make_array_from_single_device_arrays`: for every distinct index of this
     process's addressable devices, the pieces that intersect it are read (only the
     source box they need: FP8 / FP4 tiles covering it, never the whole tensor unless the
     index spans it), transformed and placed, and the result goes to its device(s) before
     the next index is read. A process reads only the slices its devices own, so host
     memory stays near the process's shards plus one device shard of one leaf.

`load_sharded(hf_dir, mesh, dtype)` is both steps with the training layout's shardings
(`sharding.param_shardings`). The result equals the whole-model import bit for bit
(tests/test_hf_stream.py).
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from moejax.config import ModelConfig
from moejax.config.v4 import V4Config
from moejax.interop import hf, hf_v4, hf_v4_config
from moejax.interop.hf_names import import_writes
from moejax.interop.lazy_view import Box, LazyView, apply, source_box
from moejax.interop.safetensors_io import RAW_DTYPES, CheckpointReader
from moejax.interop.safetensors_slices import ST_DTYPES, Source, Stored
from moejax.model.build import build_model
from moejax.sharding import param_shardings

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Piece:
    """`view` (one HF tensor in moejax layout) is leaf[index] (leading axes fixed)."""
    index: tuple[int, ...]
    view: LazyView


@dataclasses.dataclass
class Plan:
    """What the checkpoint holds and where each of its tensors goes."""
    model: ModelConfig | V4Config
    sources: dict[str, Source]
    pieces: dict[Path, list[Piece]]
    # leaves the checkpoint may leave partly unset (zeros): path -> values it leaves unset
    zero_filled: dict[Path, int] = dataclasses.field(default_factory=dict)


def _stored(reader: CheckpointReader, name: str) -> Stored:
    path, dtype, shape, offset = reader.locate(name)
    if dtype not in ST_DTYPES:
        raise ValueError(f"{name}: safetensors dtype {dtype} is not supported.")
    return Stored(str(path), offset, np.dtype(ST_DTYPES[dtype]), tuple(shape))


def _v3_plan(hf_dir: pathlib.Path, dtype: str) -> Plan:
    reader = CheckpointReader(hf_dir)
    model, skip, block = hf.describe(hf_dir, reader.names(), dtype)
    fp8 = set(RAW_DTYPES)
    sources, pieces, unknown = {}, {}, []
    for name in reader.names():
        if skip(name):
            continue
        weight = _stored(reader, name)
        if reader.locate(name)[1] in fp8:
            scale = name + "_scale_inv"
            if scale not in reader.files:
                raise ValueError(f"{name} is FP8 but {scale} is missing from the checkpoint.")
            source = Source(name, weight, "fp8", _stored(reader, scale), tuple(block))
            source.check()
        else:
            source = Source(name, weight)
        try:
            writes = import_writes(name, LazyView(name, source.shape), model)
        except KeyError:
            unknown.append(name)
            continue
        sources[name] = source
        for w in writes:
            pieces.setdefault(w.path, []).append(Piece(w.index, w.value))
    if unknown:
        raise ValueError(f"{len(unknown)} tensor name(s) of {hf_dir} are not DeepSeek-V3 "
                         f"weights moejax knows: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    return Plan(model, sources, pieces)


def _v4_plan(hf_dir: pathlib.Path, dtype: str) -> Plan:
    reader = CheckpointReader(hf_dir)
    names = set(reader.names())
    model = hf_v4.config_of(hf.read_config(hf_dir), names, param_dtype=dtype)
    sources, pieces, unknown = {}, {}, []
    for name in sorted(names):
        if hf_v4.is_scale_of_weight(name, names) or (
                model.mtp.depth == 0 and hf_v4.canonical_name(name).startswith("mtp.")):
            continue
        weight, scale = _stored(reader, name), hf_v4.scale_name(name, names)
        if scale is None:
            source = Source(name, weight)
        elif weight.dtype in (np.int8, np.uint8):
            source = Source(name, weight, "fp4", _stored(reader, scale), (1, 32))
        else:
            source = Source(name, weight, "fp8", _stored(reader, scale), (128, 128))
        source.check()
        try:
            writes = hf_v4.tensor_writes(name, LazyView(name, source.shape), model)
        except KeyError:
            unknown.append(name)
            continue
        sources[name] = source
        for path, index, view in writes:
            pieces.setdefault(path, []).append(Piece(index, view))
    if unknown:
        raise ValueError(f"{len(unknown)} tensor name(s) are not DeepSeek-V4 weights: "
                         f"{unknown[:8]}")
    hash_rows = model.moe.num_hash_layers * model.moe.num_experts  # no bias in HF
    return Plan(model, sources, pieces, {("moe_bias", "bias"): hash_rows} if hash_rows else {})


def plan(hf_dir: str | pathlib.Path, dtype: str = "float32") -> Plan:
    """The Plan of a DeepSeek-V3 or -V4 HF folder (by config.json's model_type)."""
    hf_dir = pathlib.Path(hf_dir)
    if hf.read_config(hf_dir).get("model_type") == hf_v4_config.MODEL_TYPE:
        return _v4_plan(hf_dir, dtype)
    return _v3_plan(hf_dir, dtype)


def config_dict(p: Plan, hf_dir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The full moejax ConfigDict of the planned model (as the whole-model import's)."""
    return hf.config_dict(p.model, hf.tokenizer_of(hf_dir))


def _check(p: Plan, abstract: Any) -> None:
    """Every piece fits its leaf; every leaf is covered (as the whole-model import checks)."""
    leaves = {tuple(k.key for k in path): leaf
              for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    for path, pieces in p.pieces.items():
        if path not in leaves:
            raise ValueError(f"{pieces[0].view.source}: no moejax variable "
                             f"{'/'.join(path)} in this config.")
        shape = leaves[path].shape
        for piece in pieces:
            want = shape[len(piece.index):]
            if piece.view.shape != want or any(
                    not 0 <= i < n for i, n in zip(piece.index, shape)):
                raise ValueError(f"{piece.view.source}: shape {piece.view.shape} (moejax "
                                 f"layout) does not fit {'/'.join(path)}{list(piece.index)} of "
                                 f"shape {want}; config.json and the tensors disagree.")
    bad = []
    for path, leaf in leaves.items():
        written = sum(piece.view.size for piece in p.pieces.get(path, ()))
        if written + p.zero_filled.get(path, 0) != math.prod(leaf.shape):
            bad.append(f"{'/'.join(path)} ({written} of {math.prod(leaf.shape)} values)")
    if bad:
        raise ValueError("checkpoint does not fill the model exactly (missing or duplicated "
                         f"tensors): {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}")


def read_region(p: Plan, pieces: list[Piece], box: Box, dtype: np.dtype) -> np.ndarray:
    """`box` of one leaf (zeros where no piece writes), reading only what it covers."""
    out = np.zeros(tuple(hi - lo for lo, hi in box), dtype)
    for piece in pieces:
        lead = box[:len(piece.index)]
        if not all(lo <= i < hi for i, (lo, hi) in zip(piece.index, lead)):
            continue
        inner = box[len(piece.index):]
        read = source_box(piece.view, inner)
        values = apply(piece.view, p.sources[piece.view.source].read(read), read, inner)
        out[tuple(i - lo for i, (lo, _) in zip(piece.index, lead))] = values
    return out


def _leaf(p: Plan, pieces: list[Piece], leaf: Any, sharding: jax.sharding.Sharding
          ) -> jax.Array:
    shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
    by_box: dict[Box, list[Any]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        box = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        by_box.setdefault(box, []).append(device)
    placed = {}
    for box, devices in by_box.items():  # one host region at a time
        region = read_region(p, pieces, box, dtype)
        for device in devices:
            placed[device] = jax.device_put(region, device)
        del region
    arrays = [placed[d] for d in sharding.addressable_devices_indices_map(shape)]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def stream(p: Plan, abstract: Any, shardings: Any,
           on_leaf: Callable[[Path, jax.Array], None] | None = None) -> Any:
    """The variables (`abstract`'s tree, its dtypes) as jax.Arrays laid out by `shardings`."""
    _check(p, abstract)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    out = []
    for (path, leaf), sharding in zip(flat, treedef.flatten_up_to(shardings)):
        key = tuple(k.key for k in path)
        array = _leaf(p, p.pieces.get(key, []), leaf, sharding)
        if on_leaf is not None:
            on_leaf(key, array)
        out.append(array)
    return jax.tree_util.tree_unflatten(treedef, out)


def abstract_and_shardings(model: ModelConfig | V4Config, mesh: Mesh) -> tuple[Any, Any]:
    """(ShapeDtypeStruct tree, NamedSharding tree) of the model's variables on `mesh`."""
    tokens = jax.ShapeDtypeStruct((1, 8), np.int32)
    boxed = jax.eval_shape(build_model(model).init, jax.random.key(0), tokens)
    return nn.unbox(boxed), param_shardings(boxed, mesh)


def load_sharded(hf_dir: str | pathlib.Path, mesh: Mesh, dtype: str = "float32"
                 ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """(moejax ConfigDict, variables as jax.Arrays sharded over `mesh` as training lays
    them out); the same values as `hf.load` / `hf_v4.load`."""
    p = plan(hf_dir, dtype)
    abstract, shardings = abstract_and_shardings(p.model, mesh)
    return config_dict(p, hf_dir), stream(p, abstract, shardings)


__all__ = ["Piece", "Plan", "abstract_and_shardings", "config_dict", "load_sharded", "plan",
           "read_region", "stream"]
