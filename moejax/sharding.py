"""Device mesh, the logical-axis vocabulary, the rules table and sharded initialisation.

Every parameter and large activation is annotated with *logical* axis names; `RULES` maps
each name to mesh axes; GSPMD inserts the collectives. This file is the only place where
the vocabulary is defined or extended.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax.config import MESH_AXES, Config, MeshConfig, mesh_config

# Logical axis -> what it means. Parameters first, then activations.
LOGICAL_AXES: dict[str, str] = {
    "vocab": "vocabulary rows of the embedding / columns of the LM head",
    "embed": "model dimension D of a parameter",
    "heads": "attention heads (query or key/value) of a projection",
    "head_dim": "per-head dimension K",
    "q_lora": "low-rank query latent (MLA, DeepSeek-V4 attention)",
    "kv_lora": "compressed key/value latent (MLA)",
    "o_lora": "per-group low-rank output latent (DeepSeek-V4 grouped output projection)",
    "mlp": "hidden dimension of a dense FFN",
    "expert": "routed-expert index E of an expert weight or router column",
    "expert_mlp": "hidden dimension F of a routed expert",
    "layers": "stacked layer index of a scanned stack",
    "norm": "RMSNorm scale vector (never sharded)",
    "act_batch": "batch B of an activation (split over every data-parallel axis)",
    "act_length": "sequence length L of an activation",
    "act_embed": "model dimension D of an activation",
    "act_heads": "attention heads of an activation",
    "act_mlp": "hidden dimension of an activation inside an FFN",
    "act_vocab": "vocabulary dimension of the logits",
    "act_expert": "expert index E of a dispatched activation buffer",
    "act_group": "token groups G inside the MoE once the experts own the expert axis",
}

MeshAxes = str | tuple[str, ...] | None

# Logical name -> mesh axis (or axes). One table for the whole model.
# The train state (parameters, Adam moments) is split over fsdp x expert: the input dims of
# the projections (embed, the MLA / V4 latents) ask for both; an expert weight's E dim takes
# `expert` first (a mesh axis is used once per array), so its D dim gets fsdp alone. Leaves
# whose rules leave one of STATE_AXES unused get it on another dim (`fill_state_axes`).
RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("vocab", "tensor"),
    ("embed", ("fsdp", "expert")),
    ("heads", "tensor"),
    ("head_dim", None),
    ("q_lora", ("fsdp", "expert")),
    ("kv_lora", ("fsdp", "expert")),
    ("o_lora", ("fsdp", "expert")),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_expert", "expert"),
    ("act_group", ("data", "fsdp")),
)

# Mesh axes every train-state leaf should be split over, and the logical dims never used
# for that fallback (a scanned stack's layer index is sliced per step: splitting it would
# gather the whole stack; norm scales are tiny).
STATE_AXES: tuple[str, ...] = ("fsdp", "expert")
NO_STATE_FALLBACK: tuple[str, ...] = ("layers", "norm")

_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar(
    "moejax_mesh", default=None)


def _resolve(sizes: dict[str, int], total: int, field: str, what: str) -> dict[str, int]:
    """Replaces the one -1 in `sizes` by what is left of `total`; checks the product."""
    fixed = math.prod(s for s in sizes.values() if s != -1)
    for axis, size in sizes.items():
        if size == -1:
            if total % fixed:
                raise ValueError(f"mesh.{field}{axis}=-1: {total} {what} are not divisible by "
                                 f"the other axes' product {fixed}; change the mesh sizes.")
            sizes[axis] = total // fixed
    if math.prod(sizes.values()) != total:
        named = {f"{field}{a}": s for a, s in sizes.items()}
        raise ValueError(f"mesh {named} uses {math.prod(sizes.values())} {what} but {total} "
                         f"are present; set one of them to -1 or fix the sizes.")
    return sizes


def mesh_shapes(cfg: MeshConfig, num_devices: int, num_slices: int = 1
                ) -> tuple[dict[str, int], dict[str, int]]:
    """(per-slice ICI sizes, DCN sizes = slices per axis), each -1 resolved.

    The devices must split into `num_slices` equal slices; the DCN sizes multiply to
    `num_slices`, the ICI sizes to the devices of one slice.
    """
    if num_slices < 1 or num_devices % num_slices:
        raise ValueError(f"{num_devices} devices do not split into {num_slices} equal slices.")
    dcn = _resolve({a: getattr(cfg, f"dcn_{a}") for a in MESH_AXES}, num_slices,
                   "dcn_", "slices")
    ici = _resolve({a: getattr(cfg, a) for a in MESH_AXES}, num_devices // num_slices,
                   "", "devices per slice" if num_slices > 1 else "devices")
    return ici, dcn


def mesh_shape(cfg: MeshConfig, num_devices: int, num_slices: int = 1) -> dict[str, int]:
    """Devices per mesh axis (ICI x DCN), -1 resolved; checks they use every device."""
    ici, dcn = mesh_shapes(cfg, num_devices, num_slices)
    return {a: ici[a] * dcn[a] for a in MESH_AXES}


def num_slices(devices: Sequence[Any]) -> int:
    """Distinct `device.slice_index` values (1 where devices carry none: CPU, most GPUs)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(cfg: MeshConfig, devices: Sequence[Any], topology_aware: bool = False
                ) -> np.ndarray:
    """The devices arranged as the (data, fsdp, expert, tensor) mesh.

    Several slices: `mesh_utils.create_hybrid_device_mesh` puts each slice in one block of
    the DCN axes (mostly data), so only the axes with dcn_* > 1 cross slices. One slice:
    `create_device_mesh` (ICI-topology-aware order) when `topology_aware`, else the
    devices in the given order.
    """
    devices = list(devices)
    slices = num_slices(devices)
    ici, dcn = mesh_shapes(cfg, len(devices), slices)
    ici_shape = tuple(ici[a] for a in MESH_AXES)
    if slices > 1:
        return mesh_utils.create_hybrid_device_mesh(ici_shape, tuple(dcn[a] for a in MESH_AXES),
                                                    devices)
    if topology_aware and len(devices) > 1:
        try:
            return ici_device_grid(ici_shape, devices)
        except Exception:  # noqa: BLE001 - fake CPU devices have no topology
            pass
    return np.asarray(devices).reshape(ici_shape)


def ici_device_grid(shape: tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
    """`create_device_mesh`'s ICI-topology-aware grid of one slice. A mesh axis that no
    product of the chip grid's sides gives (expert 32 on v5p-2048's 8 x 8 x 16) splits a
    physical axis (`allow_split_physical_axes`), with a warning: such an axis's neighbours
    are not all one ICI hop apart."""
    try:
        return mesh_utils.create_device_mesh(shape, devices)
    except Exception as err:  # noqa: BLE001 - mesh_utils raises several kinds
        if "allow_split_physical_axes" not in str(err):
            raise
    logging.getLogger(__name__).warning(
        "mesh %s does not map onto whole axes of the chip grid; splitting physical axes "
        "(allow_split_physical_axes): collectives over a split axis take more ICI hops.",
        dict(zip(MESH_AXES, shape)))
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def make_mesh(cfg: MeshConfig | Config | Any, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the (data, fsdp, expert, tensor) mesh from the mesh section (see `device_grid`)."""
    if isinstance(cfg, Config):
        cfg = cfg.mesh
    elif not isinstance(cfg, MeshConfig):
        cfg = mesh_config(cfg.get("mesh", cfg) if hasattr(cfg, "get") else cfg)
    devices = list(devices if devices is not None else jax.devices())
    grid = device_grid(cfg, devices, topology_aware=devices == list(jax.devices()))
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None], rules: Sequence[tuple[str, MeshAxes]] = RULES,
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None
                    ) -> PartitionSpec:
    """Maps logical names to a PartitionSpec.

    A mesh axis is used at most once per array (the first dimension that asks for it wins),
    and with `shape` and `mesh` given, axes that do not divide the dimension are dropped so
    that the dimension stays whole rather than unevenly split.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for dim, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; add it to moejax/sharding.py.")
        axes = table[name]
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        kept = []
        for axis in axes:
            if axis in used:
                continue
            if mesh is not None and shape is not None:
                size = math.prod(mesh.shape[a] for a in kept + [axis])
                if shape[dim] % size:
                    continue
            kept.append(axis)
        used.update(kept)
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return PartitionSpec(*out)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, cfg: Any = None,
             rules: Sequence[tuple[str, MeshAxes]] = RULES) -> Iterator[Mesh]:
    """Activates `mesh` for jit and the logical rules for activation constraints."""
    del cfg  # the rules table is global today; the argument keeps the public API stable
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh of the innermost `use_mesh`, or None outside it."""
    active = _ACTIVE.get()
    return None if active is None else active[0]


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside `use_mesh`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(names, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _spec_axes(entry: MeshAxes) -> tuple[str, ...]:
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def fill_state_axes(spec: PartitionSpec, names: Sequence[str | None], shape: Sequence[int],
                    mesh: Mesh, axes: Sequence[str] = STATE_AXES) -> PartitionSpec:
    """Adds each of `axes` that `spec` leaves unused to a dimension it divides.

    The rules map a leaf's logical names; when none of them asks for fsdp (say, a V4
    output projection [groups, H*K/groups, o_lora] with mesh.tensor = 1, or a leaf without
    names), that leaf would be whole on every fsdp shard and its Adam moments with it. Here
    the axis goes to the largest dimension that it (times the axes already there) divides,
    never to a `layers` or `norm` dimension; with no such dimension the leaf stays as is.
    """
    entries = [_spec_axes(e) for e in tuple(spec) + (None,) * (len(shape) - len(spec))]
    used = {a for e in entries for a in e}
    for axis in axes:
        if axis in used or mesh.shape.get(axis, 1) == 1:
            continue
        best = None
        for dim, size in enumerate(shape):
            if names[dim] in NO_STATE_FALLBACK:
                continue
            split = math.prod(mesh.shape[a] for a in entries[dim]) * mesh.shape[axis]
            if size % split == 0 and (best is None or size > shape[best]):
                best = dim
        if best is not None:
            entries[best] = entries[best] + (axis,)
            used.add(axis)
    return PartitionSpec(*[None if not e else (e[0] if len(e) == 1 else e) for e in entries])


def param_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
               rules: Sequence[tuple[str, MeshAxes]] = RULES) -> PartitionSpec:
    """A train-state leaf's spec: its rules, then the STATE_AXES fallback."""
    return fill_state_axes(logical_to_spec(names, rules, shape, mesh), names, shape, mesh)


def constrain_weight(w: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """A parameter at its use: split as its rules say, but whole over STATE_AXES (except
    an `expert` dimension, which stays with its experts); a no-op outside `use_mesh`.

    This is FSDP's all-gather made explicit. Without it GSPMD may keep the weight's
    fsdp-split D dim in the einsum and instead gather the *activations* over the token
    groups: measured on DeepSeek-V4-Flash (v5p 8x8x4, 2 sequences of 4096 per chip) the
    expert down-projection's weight gradient then held the whole global dispatch buffer
    [E, G, D, C] (120 GiB) on every chip. With the weight gathered the gradient is
    partial-summed over the local groups and reduce-scattered back to the state layout.
    """
    active = _ACTIVE.get()
    if active is None:
        return w
    mesh, rules = active
    spec = logical_to_spec(names, rules, w.shape, mesh)
    kept = []
    for name, entry in zip(names, tuple(spec) + (None,) * (w.ndim - len(spec))):
        axes = tuple(a for a in _spec_axes(entry) if name == "expert" or a not in STATE_AXES)
        kept.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return jax.lax.with_sharding_constraint(w, NamedSharding(mesh, PartitionSpec(*kept)))


def per_batch_shard(fn: Callable[..., jax.Array], *arrays: jax.Array) -> jax.Array:
    """fn(*arrays) computed on each device's own rows of dim 0 (shard_map over the axes
    `act_batch` maps dim 0 to); plain fn(*arrays) outside `use_mesh`.

    For row-independent gathers/scatters (the MoE's token <-> slot moves): XLA's SPMD
    partitioner did not split the scatter-add that transposes a batched
    `take_along_axis` over its batch dim and built it whole on every chip (measured: four
    bf16 [G, S+1, D] = 16 GiB buffers per MoE layer, DeepSeek-V4-Flash on 256 chips). Every
    array must have dim 0 = the rows; the result too. `fn` must not call `constrain`.
    """
    active = _ACTIVE.get()
    if active is None:
        return fn(*arrays)
    mesh = active[0]
    rows = logical_to_spec(("act_batch",), active[1], arrays[0].shape[:1], mesh)[0]
    if rows is None:
        return fn(*arrays)
    spec = lambda a: PartitionSpec(rows, *([None] * (a.ndim - 1)))  # noqa: E731
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(a) for a in arrays),
                           out_specs=PartitionSpec(rows), check_vma=False)
    return mapped(*arrays)


def param_shardings(abstract_variables: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, MeshAxes]] = RULES) -> Any:
    """NamedShardings for a variables tree whose leaves are nn.Partitioned (or plain).

    Every leaf is split over fsdp x expert where its dims allow (see `fill_state_axes`);
    unannotated leaves count as having no logical names.
    """
    def one(leaf: Any) -> NamedSharding:
        if isinstance(leaf, nn.Partitioned):
            spec = param_spec(leaf.names, leaf.value.shape, mesh, rules)
        elif getattr(leaf, "shape", ()):
            spec = param_spec((None,) * len(leaf.shape), leaf.shape, mesh, rules)
        else:
            spec = PartitionSpec()
        return NamedSharding(mesh, spec)
    return jax.tree.map(one, abstract_variables,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def logical_names(variables: Any) -> Any:
    """The tree of logical axis-name tuples (None for unannotated leaves)."""
    return jax.tree.map(lambda x: x.names if isinstance(x, nn.Partitioned) else None,
                        variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def init_variables(model: nn.Module, cfg: Any, mesh: Mesh, rng: jax.Array,
                   batch_shape: tuple[int, int] = (1, 8)) -> Any:
    """Initialises the variables directly sharded over `mesh` (abstract init -> jitted init).

    Nothing is built whole and split afterwards: `jax.eval_shape` gives the shapes and
    logical names, the rules give shardings, and a jitted init writes each shard in place.
    """
    del cfg
    tokens = jnp.zeros(batch_shape, jnp.int32)
    init_fn: Callable[[jax.Array], Any] = lambda r: model.init(r, tokens)
    with use_mesh(mesh):
        abstract = jax.eval_shape(init_fn, rng)
        shardings = param_shardings(abstract, mesh)
        variables = jax.jit(init_fn, out_shardings=shardings)(rng)
    return nn.unbox(variables)

