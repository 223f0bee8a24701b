"""Mesh construction: ICI / DCN sizes, multi-slice device grids, single-slice unchanged."""
import dataclasses

import jax
import numpy as np
import pytest

from moejax.config import MeshConfig, mesh_config
from moejax.sharding import device_grid, make_mesh, mesh_shape, mesh_shapes


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What mesh construction reads from a device (pure mapping logic, no backend)."""
    id: int
    slice_index: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def fake_slices(num_slices: int, per_slice: int, hosts_per_slice: int = 1) -> list[FakeDevice]:
    per_host = per_slice // hosts_per_slice
    return [FakeDevice(id=s * per_slice + i, slice_index=s,
                       process_index=(s * per_slice + i) // per_host)
            for s in range(num_slices) for i in range(per_slice)]


def test_single_slice_resolves_dcn_to_one_and_keeps_the_old_sizes():
    ici, dcn = mesh_shapes(MeshConfig(data=-1, expert=4), 8)
    assert ici == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert dcn == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    assert mesh_shape(MeshConfig(fsdp=2, expert=2, tensor=2, data=1), 8) == {
        "data": 1, "fsdp": 2, "expert": 2, "tensor": 2}


def test_eight_cpu_devices_mesh_is_the_devices_in_order():
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    np.testing.assert_array_equal(np.vectorize(lambda d: d.id)(mesh.devices),
                                  np.arange(8).reshape(2, 1, 4, 1))
    assert list(mesh.devices.flat) == jax.devices()


def test_slices_go_over_data_by_default():
    devices = fake_slices(num_slices=2, per_slice=4)
    ici, dcn = mesh_shapes(MeshConfig(expert=4), 8, 2)
    assert (ici["data"], ici["expert"], dcn["data"], dcn["expert"]) == (1, 4, 2, 1)
    grid = device_grid(MeshConfig(expert=4), devices)
    assert grid.shape == (2, 1, 4, 1)
    slices = np.vectorize(lambda d: d.slice_index)(grid)
    # each data index holds exactly one whole slice: only the data axis crosses the DCN
    np.testing.assert_array_equal(slices[:, 0, :, 0], [[0] * 4, [1] * 4])


def test_dcn_axis_blocks_are_whole_slices():
    cfg = MeshConfig(data=2, fsdp=2, expert=1, tensor=2, dcn_data=2, dcn_fsdp=2)
    devices = fake_slices(num_slices=4, per_slice=8, hosts_per_slice=2)
    grid = device_grid(cfg, devices)
    assert grid.shape == (4, 4, 1, 2)
    slices = np.vectorize(lambda d: d.slice_index)(grid)
    for i in range(2):  # block (i, j) of the DCN grid is slice 2 i + j
        for j in range(2):
            block = slices[2 * i:2 * i + 2, 2 * j:2 * j + 2]
            assert (block == 2 * i + j).all(), slices
    assert sorted(d.id for d in grid.flat) == list(range(32))


def test_slice_count_must_match_the_dcn_sizes():
    with pytest.raises(ValueError, match=r"mesh \{'dcn_data': 1.*2 are present"):
        device_grid(MeshConfig(dcn_data=1), fake_slices(2, 4))
    with pytest.raises(ValueError, match="dcn_data=-1: 3 slices"):
        device_grid(MeshConfig(dcn_expert=2), fake_slices(3, 2))
    with pytest.raises(ValueError, match="devices per slice"):
        device_grid(MeshConfig(data=1, expert=8), fake_slices(2, 4))


@pytest.mark.parametrize("field, value, fix", [
    ("dcn_data", 0, "use a positive size or -1"),
    ("dcn_expert", -1, "at most one of"),
])
def test_bad_dcn_fields_are_named(field, value, fix):
    with pytest.raises(ValueError, match=fix) as err:
        mesh_config({field: value})
    assert "dcn_" in str(err.value)


def test_expert_divisibility_counts_the_dcn_expert_slices():
    from moejax.config import model_config
    model = model_config({"moe": {"num_experts": 8}})
    mesh_config({"expert": 4, "dcn_expert": 2}, model)
    with pytest.raises(ValueError, match="mesh.expert x mesh.dcn_expert"):
        mesh_config({"expert": 4, "dcn_expert": 4}, model)


def test_batch_layout_of_one_process_is_every_row_in_order():
    from moejax.distributed import BatchLayout
    from moejax.train.step import batch_sharding
    mesh = make_mesh(MeshConfig(data=2, expert=2, tensor=2))
    layout = BatchLayout(batch_sharding(mesh, 8, 4), 8, 4)
    np.testing.assert_array_equal(layout.rows, np.arange(8))
    assert layout.owned.all()
    host = {"tokens": np.arange(32, dtype=np.int32).reshape(8, 4)}
    out = layout.to_global(host)["tokens"]
    assert out.sharding == batch_sharding(mesh, 8, 4)
    np.testing.assert_array_equal(np.asarray(out), host["tokens"])
    with pytest.raises(ValueError, match="supplies 8 rows"):
        layout.to_global({"tokens": host["tokens"][:4]})
