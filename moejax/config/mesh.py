"""The mesh section: device-mesh axis sizes inside a slice (ICI) and across slices (DCN)."""
from __future__ import annotations

import dataclasses
from typing import Any

from moejax.config.checks import check as _check
from moejax.config.choices import MESH_AXES
from moejax.config.coerce import dataclass_from_dict


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: each axis is (inside one slice, ICI) x (across slices, DCN) devices.

    The four plain fields split the devices of one slice (a TPU slice, or all devices when
    there is one); the `dcn_*` fields split the slices of a multi-slice job, which talk over
    the data-centre network (MaxText's ici_* / dcn_* split). Mesh axis `a` has
    `a * dcn_a` devices. One slice: every dcn_* resolves to 1, so single-slice configs are
    unchanged. Several slices: by default the data axis spans them (dcn_data=-1).
    """
    data: int = -1  # replicas of the parameters; -1 = every device not used by the others
    fsdp: int = 1  # parameters sharded, gathered per layer
    expert: int = 1  # experts split; the batch is split over it too outside the MoE
    tensor: int = 1  # heads / hidden dims split
    dcn_data: int = -1  # slices along data; -1 = every slice not used by the other dcn_*
    dcn_fsdp: int = 1  # slices along fsdp (parameter gathers cross the DCN: rarely wise)
    dcn_expert: int = 1  # slices along expert (all-to-alls cross the DCN)
    dcn_tensor: int = 1  # slices along tensor (per-layer collectives over DCN: avoid)


def validate_mesh(mesh: MeshConfig, model: Any = None) -> None:
    """Checks axis sizes and that the model's sharded dims divide by them."""
    for prefix, what in (("", "devices of a slice"), ("dcn_", "slices")):
        sizes = {f"{prefix}{a}": getattr(mesh, f"{prefix}{a}") for a in MESH_AXES}
        for axis, size in sizes.items():
            _check(size == -1 or size >= 1, f"mesh.{axis}", size, "use a positive size or -1.")
        _check(list(sizes.values()).count(-1) <= 1, "mesh", sizes,
               f"at most one of {list(sizes)} may be -1 (it takes the remaining {what}).")
    if model is None:
        return
    expert, tensor = _known_size(mesh, "expert"), _known_size(mesh, "tensor")
    if expert > 1:
        _check(model.moe.num_experts % expert == 0, "model.moe.num_experts",
               model.moe.num_experts, f"must be divisible by the expert axis ({expert} = "
               "mesh.expert x mesh.dcn_expert); change the expert count or the axis sizes.")
    if tensor > 1 and getattr(model.moe, "expert_parallel", "gspmd") == "shard_map":
        _check(model.moe.expert_hidden % tensor == 0, "model.moe.expert_hidden",
               model.moe.expert_hidden, f"must be divisible by the tensor axis ({tensor} = "
               "mesh.tensor x mesh.dcn_tensor) with model.moe.expert_parallel='shard_map' "
               "(F is split over tensor).")
    if tensor > 1:
        heads, count = model.tensor_heads
        _check(count % tensor == 0, f"model.{heads}", count,
               f"must be divisible by the tensor axis ({tensor} = mesh.tensor x "
               "mesh.dcn_tensor).")


def _known_size(mesh: MeshConfig, axis: str) -> int:
    """Devices along `axis` as far as the config alone says (-1 counts as 1)."""
    return max(getattr(mesh, axis), 1) * max(getattr(mesh, f"dcn_{axis}"), 1)


def mesh_config(section: Any, model: Any = None) -> MeshConfig:
    """Builds and validates the mesh section (against the model when given)."""
    mesh = dataclass_from_dict(MeshConfig, section, "mesh")
    validate_mesh(mesh, model)
    return mesh
