"""Per-device training memory of a config on a mesh, without devices (moejax.plan --mesh).

    python -m moejax.plan --config configs/deepseek_v4.py:flash --mesh fsdp=32,expert=8 \\
        --chip v5p --json

* **State** (parameters, optimizer state, balance biases / frozen tables / step): the
  train state exactly as `make_setup` lays it out, on a `jax.sharding.AbstractMesh` of the
  given sizes; each leaf's bytes are its shard's (`sharding.shard_shape`), so a leaf the
  rules leave unsplit counts whole on every device. With `--chip` (a TPU) each shard is
  padded as XLA:TPU lays arrays out in HBM: the minor dimension to a multiple of 128 and the
  second-minor to 8 rows of 32-bit words (16 bf16), with the minor dimension the one that
  pads least (what XLA picks for entry parameters; it reproduced the compiled argument size
  of configs/tiny.py, whose 32-wide dims pad 1.7x, to the byte). This is the figure
  `moejax.aot` reports as arguments, less the batch.
* **Gradients**: one fp32 gradient per parameter shard (the step casts them to fp32), and
  a second one, the accumulator, when `train.micro_batches` > 1.
* **Activations per remat policy**: the residuals the backward pass keeps, read from the
  real loss (`jax.vjp` of the train step's micro-batch loss, traced at this device's rows
  of a micro-batch; the parameters and the batch themselves are not counted). Under
  `nn.scan` they are the per-layer residuals stacked over the layers: "full" keeps each
  layer's input, "save_moe" adds the attention and FFN outputs, "dots" every matmul output
  (attention scores included), "none" everything, and all policies keep the loss's fp32
  logits. Rows are split over (data, fsdp, expert) as `act_batch` is; heads are treated as
  whole (an overestimate with mesh.tensor > 1).
  Tracing at two row counts splits the residuals into a per-row part and a
  batch-independent part (weights cast to the compute dtype, kept by "none" and "dots"),
  which is counted at the parameters' per-device share.
* **Layer working set**: the largest layer's weights gathered over fsdp (compute dtype)
  and their whole fp32 gradient before it is reduce-scattered (`layer_working_bytes`).
* **Layer backward**: the backward of one layer holds what that layer's forward left
  (policy "none"'s residuals of one layer: the ones `model.remat_policy` did not keep are
  recomputed) and their cotangents, about as large again: with L layers (MTP blocks
  included), (none - policy) / L + none / L (`layer_backward_bytes`). For DeepSeek-V4 it
  is mostly attention scores in fp32 ([rows, H, L, entries], several per layer), for V3
  the MoE dispatch buffers.
* **Largest batch**: activations grow linearly with rows, so the largest global
  `train.batch_size` (at the config's micro_batches) with state + gradients + activations
  within the chip's HBM.

Where it misses (against `moejax.aot`, docs/pod-scale.md has the numbers): XLA's
temporaries also hold collective buffers, gathered weights prefetched for the next layer
(the working set counts one layer), layout copies and fusion scratch, and XLA may keep
less than the jaxpr's residuals (it recomputes cheap ones). Host offload is not modelled:
"offload" counts as "full". The state agrees within a few per cent.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from moejax.config import MESH_AXES, REMAT_POLICIES, resolve
from moejax.model.build import build_model
from moejax.sharding import logical_names, logical_to_spec
from moejax.topology import GIB
from moejax.train import step
from moejax.train.loss import mtp_depth, target_counts
from moejax.train.state import abstract_key, make_setup

# HBM per chip as XLA:TPU reports it (libtpu 0.0.42.1, `moejax.topology.hbm_bytes`).
USABLE_HBM_BYTES = {"v4": int(30.75 * GIB), "v5e": int(15.75 * GIB), "v5p": int(95.74 * GIB),
                    "v6e": int(31.25 * GIB)}


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=32,expert=8' -> every mesh axis's size (axes not named are 1)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        axis, _, value = part.partition("=")
        if axis not in sizes or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {text!r}: expected axis=size pairs over {MESH_AXES} "
                             f"with positive sizes, e.g. 'fsdp=32,expert=8'.")
        sizes[axis] = int(value)
    return sizes


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def tpu_tiled_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes of an array in TPU HBM: (8 x 32-bit rows, 128 lanes) tiles over the two minor
    dims, the minor one chosen to pad least; small second-minor dims take smaller tiles."""
    if len(shape) == 0:
        return itemsize
    if len(shape) == 1:
        return _round_up(shape[0], 128) * itemsize
    rows = 8 * max(1, 4 // itemsize)

    def padded(order: tuple[int, ...]) -> int:
        *major, second, minor = order
        tile = min(rows, 1 << max(second - 1, 0).bit_length())
        return math.prod(major) * _round_up(second, tile) * _round_up(minor, 128)
    return itemsize * min(padded(shape[:i] + shape[i + 1:] + (shape[i],))
                          for i in range(len(shape)))


def shard_bytes(leaf: jax.ShapeDtypeStruct, tiled: bool) -> int:
    """Bytes of one device's shard of an abstract leaf (TPU-tiled if `tiled`)."""
    shape = tuple(leaf.sharding.shard_shape(leaf.shape))
    itemsize = jnp.dtype(leaf.dtype).itemsize
    return tpu_tiled_bytes(shape, itemsize) if tiled else math.prod(shape) * itemsize


def abstract_setup(config: Any, sizes: dict[str, int]) -> tuple[Any, Any]:
    """(resolved Config with the mesh sizes, TrainSetup on an AbstractMesh of them)."""
    config = config.copy_and_resolve_references()
    for axis, size in sizes.items():
        config.mesh[axis] = size
    cfg = resolve(config)
    mesh = jax.sharding.AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                                     axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
    return cfg, make_setup(cfg, mesh)


def state_bytes(setup: Any, tiled: bool) -> dict[str, int]:
    """Per-device bytes of the train state by part, and of the fp32 gradients."""
    a = setup.abstract
    total = lambda tree: sum(shard_bytes(x, tiled) for x in jax.tree.leaves(tree))  # noqa: E731
    grads = sum(shard_bytes(jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding),
                            tiled) for x in jax.tree.leaves(a.params))
    return {"params": total(a.params), "optimizer": total(a.opt_state),
            "other_state": total((a.step, a.moe_bias, a.frozen)), "gradients": grads}


def batch_shards(cfg: Any, mesh: Any) -> int:
    """Devices a micro-batch's rows are split over (`act_batch`, axes that divide it)."""
    rows = cfg.train.batch_size // cfg.train.micro_batches
    spec = logical_to_spec(("act_batch", "act_length"), shape=(rows, cfg.train.seq_len),
                           mesh=mesh)
    axes = spec[0] if isinstance(spec[0], tuple) else ((spec[0],) if spec[0] else ())
    return math.prod(mesh.shape[a] for a in axes)


def one_micro_batch_loss(setup: Any, cfg: Any) -> Any:
    """(params, fixed, micro-batch, rng) -> the train step's loss of one micro-batch."""

    def loss(params: Any, fixed: Any, mb: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
        denoms = target_counts(mb["segment_ids"], mtp_depth(cfg) > 0)
        return step.micro_loss(setup, cfg, params, fixed, mb, rng, denoms, 1)[0]
    return loss


def residual_bytes(fn: Any, params: Any, *args: Any) -> int:
    """Bytes the backward pass of `fn` w.r.t. `params` keeps (not `params` or `args`)."""
    closed, shapes = jax.make_jaxpr(lambda p, *a: jax.vjp(lambda q: fn(q, *a), p),
                                    return_shape=True)(params, *args)
    count = len(jax.tree.leaves(shapes[1]))
    inputs = {id(v) for v in closed.jaxpr.invars}
    seen: set[int] = set()
    total = 0
    for var in closed.jaxpr.outvars[len(closed.jaxpr.outvars) - count:]:
        if not hasattr(var, "aval") or id(var) in inputs or id(var) in seen \
                or type(var).__name__ == "Literal":
            continue
        seen.add(id(var))
        aval = var.aval
        total += math.prod(aval.shape) * jnp.dtype(aval.dtype).itemsize
    return total


def activation_bytes(cfg: Any, setup: Any, policy: str, rows: int) -> int:
    """Residual bytes of one micro-batch of `rows` rows under remat `policy`."""
    model_cfg = dataclasses.replace(cfg.model, remat_policy=policy)
    cfg_p = dataclasses.replace(cfg, model=model_cfg)
    setup_p = dataclasses.replace(setup, model=build_model(model_cfg))
    plain = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
    params = jax.tree.map(plain, setup.abstract.params)
    fixed = {k: jax.tree.map(plain, v) for k, v in setup.abstract.variables().items()
             if k != "params"}
    mb = {k: jax.ShapeDtypeStruct((rows, cfg.train.seq_len), jnp.int32)
          for k in ("tokens", "segment_ids", "positions")}
    return residual_bytes(one_micro_batch_loss(setup_p, cfg_p), params, fixed, mb, abstract_key())


def activation_line(cfg: Any, setup: Any, policy: str, rows: int) -> tuple[float, int]:
    """(residual bytes per row, batch-independent residual bytes) of `policy`, from traces
    at `rows` and 2 * `rows` rows. The batch-independent part is what the backward keeps of
    the weights (their compute-dtype casts, with remat policies that save them); traced at
    global shapes it is whole, on the mesh it is split like the parameters."""
    one, two = (activation_bytes(cfg, setup, policy, n) for n in (rows, 2 * rows))
    per_row = (two - one) / rows
    return per_row, max(int(one - per_row * rows), 0)


def _whole_bytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def layer_working_bytes(cfg: Any, setup: Any) -> int:
    """Bytes one layer's step holds beyond the state: its weights gathered over fsdp (in the
    compute dtype) and their whole fp32 gradient before the reduce-scatter, for the largest
    layer. Layers are the parameter groups under the first two path keys (a scanned stack,
    an unrolled layer, the MTP block, the embedding, the head); a stacked leaf counts one
    row of its `layers` axis."""
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    boxed = jax.eval_shape(setup.model.init, abstract_key(), tokens)
    names = jax.tree.leaves(logical_names(boxed["params"]),
                            is_leaf=lambda x: isinstance(x, tuple) or x is None)
    leaves = jax.tree_util.tree_leaves_with_path(setup.abstract.params)
    units: dict[tuple[str, ...], float] = {}
    for (path, leaf), axis_names in zip(leaves, names):
        spec = tuple(leaf.sharding.spec) + (None,) * len(leaf.shape)
        split = 1
        for entry in spec[:len(leaf.shape)]:
            for axis in (entry if isinstance(entry, tuple) else (entry,)):
                if axis is not None and axis != "fsdp":
                    split *= setup.mesh.shape[axis]
        size = math.prod(leaf.shape) / split
        if axis_names and "layers" in axis_names:
            size /= leaf.shape[axis_names.index("layers")]
        key = tuple(str(getattr(k, "key", k)) for k in path[:2])
        units[key] = units.get(key, 0.0) + size
    compute = jnp.dtype(cfg.model.dtype).itemsize
    return int(max(units.values(), default=0.0) * (compute + 4))


def layer_backward_bytes(activations: dict[str, int], policy: str, layers: int) -> int:
    """One layer's backward: its recomputed residuals and their cotangents (module doc)."""
    none = activations["none"]
    return int((max(none - activations[policy], 0) + none) / max(layers, 1))


def memory_plan(config: Any, sizes: dict[str, int], chip: str | None = None) -> dict[str, Any]:
    """Per-device memory of `config` (ConfigDict) on a mesh of `sizes`; see the module doc."""
    if chip is not None and chip not in USABLE_HBM_BYTES:
        raise ValueError(f"--chip {chip!r}: one of {sorted(USABLE_HBM_BYTES)}.")
    cfg, setup = abstract_setup(config, sizes)
    state = state_bytes(setup, tiled=chip is not None)
    shards = batch_shards(cfg, setup.mesh)
    micro_rows = cfg.train.batch_size // cfg.train.micro_batches
    rows = max(micro_rows // shards, 1)
    weight_share = state["params"] / max(_whole_bytes(setup.abstract.params), 1)
    lines = {p: activation_line(cfg, setup, p, rows) for p in REMAT_POLICIES}
    activations = {p: int(per_row * rows + weights * weight_share)
                   for p, (per_row, weights) in lines.items()}
    layer = layer_working_bytes(cfg, setup)
    policy = cfg.model.remat_policy
    gradients = state["gradients"] * (2 if cfg.train.micro_batches > 1 else 1)
    layers = cfg.model.num_layers + mtp_depth(cfg)
    backward = layer_backward_bytes(activations, policy, layers)
    fixed = state["params"] + state["optimizer"] + state["other_state"] + gradients + layer
    out: dict[str, Any] = {
        "devices": math.prod(sizes.values()), "mesh": sizes, "chip": chip,
        "rows_per_device": micro_rows / shards, "params_bytes": state["params"],
        "optimizer_bytes": state["optimizer"], "other_state_bytes": state["other_state"],
        "state_bytes": state["params"] + state["optimizer"] + state["other_state"],
        "gradient_bytes": gradients, "layer_working_bytes": layer,
        "layer_backward_bytes": backward,
        "activation_bytes": activations,
        "remat_policy": policy, "total_bytes": fixed + backward + activations[policy],
    }
    if chip is not None:
        hbm = USABLE_HBM_BYTES[chip]
        # activations and the layer backward both grow linearly with the rows
        per_row = lines[policy][0] + (2 * lines["none"][0] - lines[policy][0]) / layers
        fit_rows = max(int((hbm - fixed) // per_row), 0) if per_row else 0
        out.update(hbm_bytes=hbm, fits=out["total_bytes"] <= hbm,
                   max_batch_size=fit_rows * shards * cfg.train.micro_batches)
    return out
