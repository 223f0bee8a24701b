"""TPU topologies by the names Google sells them, for ahead-of-time compilation (moejax.aot).

    parse_topology("v5p-512")    -> 256 chips, grid 4x8x8 (v4 / v5p count TensorCores, 2 a chip)
    parse_topology("v5e-16")     -> 16 chips, grid 4x4   (v5e / v6e count chips)
    parse_topology("v5p:8x8x4")  -> the chip grid as given

v4 and v5p slices are 3-D tori: 4, 8, 16 and 32 chips are 2x2x1, 2x2x2, 2x2x4 and 2x4x4;
larger slices are multiples of 4 chips along every side, and the shape Google provisions
for a size is the most cube-like one (smallest longest side, then largest shortest side:
v5p-512 is 4x8x8, v5p-768 4x8x12, v5p-9216 12x16x24). v5e and v6e slices are 2-D, 1 to
256 chips. `topology_devices` asks libtpu for the devices of one or more slices
(`jax.experimental.topologies.get_topology_desc`); they can be compiled for, never run on.

HBM per chip is the capacity the XLA:TPU compiler reports when a program does not fit
(`hbm_bytes` compiles a deliberately oversized program once to read it); `NOMINAL_HBM_GIB`
is the fallback: v4 32 GiB, v5e 16, v5p 95, v6e 32.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any

GIB = 1 << 30
NOMINAL_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}  # as counted in the product name
GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
            128: (8, 16), 256: (16, 16)}
SMALL_GRIDS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}


@dataclasses.dataclass(frozen=True)
class Topology:
    """One TPU slice (times `num_slices`): generation, chip grid and libtpu's names for it."""
    generation: str  # "v4", "v5e", "v5p" or "v6e"
    grid: tuple[int, ...]  # chips along each torus axis
    name: str  # what the user typed

    @property
    def chips(self) -> int:
        """Chips in one slice (one JAX device per chip)."""
        return math.prod(self.grid)

    @property
    def topology_name(self) -> str:
        """libtpu's name: 'v5p:4x8x8'."""
        return f"{self.generation}:{'x'.join(map(str, self.grid))}"

    @property
    def chip_config_name(self) -> str:
        """One JAX device per chip: v4's two TensorCores run fused ('megacore'), as JAX
        uses v4; v5p is megacore by default; v5e / v6e have one TensorCore."""
        return "megacore" if self.generation == "v4" else "default"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """Chips of one host along each axis: a 2x2 board, or the whole slice if smaller."""
        padded = (*self.grid, 1, 1)[:3]
        return tuple(min(g, b) for g, b in zip(padded, (2, 2, 1)))  # type: ignore[return-value]


def _cube_like_grid(chips: int) -> tuple[int, int, int]:
    """The 3-D grid of a v4 / v5p slice of `chips` chips (see the module docstring)."""
    if chips in SMALL_GRIDS_3D:
        return SMALL_GRIDS_3D[chips]
    if chips % 64:
        raise ValueError(f"{chips} chips: v4 / v5p slices have 4, 8, 16, 32 or a multiple of "
                         f"64 chips; give the chip grid instead (e.g. 'v5p:4x4x12').")
    blocks = chips // 64  # 4x4x4 blocks
    best = None
    for a in range(1, blocks + 1):
        for b in range(a, blocks // a + 1):
            if blocks % (a * b) or blocks // (a * b) < b:
                continue
            shape = (a, b, blocks // (a * b))
            key = (max(shape), -min(shape))
            if best is None or key < best[0]:
                best = (key, shape)
    return tuple(4 * s for s in best[1])  # type: ignore[return-value]


def _generation(text: str) -> str:
    gen = {"v5": "v5p", "v5litepod": "v5e", "v5lite": "v5e"}.get(text, text)
    if gen not in NOMINAL_HBM_GIB:
        raise ValueError(f"TPU generation {text!r} is unknown; use one of "
                         f"{sorted(NOMINAL_HBM_GIB)} (e.g. 'v5p-512' or 'v5p:4x8x8').")
    return gen


def parse_topology(name: str) -> Topology:
    """'v5p-512' / 'v5e-16' / 'v6e-256' / 'v4-8' / 'v5p:8x8x4' -> Topology."""
    text = name.strip().lower()
    grid_match = re.fullmatch(r"(v\w+?):(\d+(?:x\d+)+)", text)
    if grid_match:
        gen = _generation(grid_match.group(1))
        grid = tuple(int(s) for s in grid_match.group(2).split("x"))
        want = 2 if gen in ("v5e", "v6e") else 3
        if len(grid) != want or min(grid) < 1:
            raise ValueError(f"topology {name!r}: {gen} chip grids have {want} sides "
                             f"(e.g. {'v5e:4x4' if want == 2 else 'v5p:4x8x8'}).")
        return Topology(gen, grid, name)
    size_match = re.fullmatch(r"(v\w+?)-(\d+)", text)
    if not size_match:
        raise ValueError(f"topology {name!r}: expected a product name like 'v5p-512', "
                         f"'v5e-16', 'v6e-256', 'v4-8', or a chip grid like 'v5p:8x8x4'.")
    gen = _generation(size_match.group(1))
    count = int(size_match.group(2))
    per_chip = CORES_PER_CHIP[gen]
    if count % per_chip:
        raise ValueError(f"topology {name!r}: {gen}-N counts TensorCores, {per_chip} per chip; "
                         f"N must be even.")
    chips = count // per_chip
    if gen in ("v5e", "v6e"):
        if chips not in GRIDS_2D:
            raise ValueError(f"topology {name!r}: {gen} slices have {sorted(GRIDS_2D)} chips.")
        return Topology(gen, GRIDS_2D[chips], name)
    return Topology(gen, _cube_like_grid(chips), name)


def topology_devices(topology: Topology, num_slices: int = 1) -> list[Any]:
    """The compile-only devices of `num_slices` slices of `topology` (needs libtpu).

    Run with JAX_PLATFORMS=cpu: nothing is executed on these devices. Sets
    ALLOW_MULTIPLE_LIBTPU_LOAD=1 (unless set), since compiling for a topology never
    touches a TPU and should not wait on another process's libtpu lock.
    """
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies  # noqa: PLC0415
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topology.topology_name,
            chip_config_name=topology.chip_config_name,
            chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=num_slices)
    except Exception as err:  # noqa: BLE001 - libtpu missing or the name refused
        raise RuntimeError(
            f"could not describe TPU topology {topology.topology_name} x {num_slices} slice(s)"
            f" ({err}). Compiling for TPUs needs libtpu: pip install -e '.[tpu]'.") from err
    return list(desc.devices)


_CAPACITY = re.compile(r"available HBM \(([\d.]+)([KMGT]?)\)|Used [\d.]+[KMGT]? of ([\d.]+)([KMGT]?) hbm")


def parse_size(number: str, unit: str) -> int:
    """'95.74', 'G' -> bytes (XLA prints binary units: G = 2**30)."""
    return int(float(number) * 1024 ** "BKMGT".index(unit or "B"))


@functools.lru_cache(maxsize=None)
def _probe_hbm(device: Any) -> int | None:
    """HBM capacity of `device` as XLA:TPU reports it for a program that cannot fit."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from jax.sharding import SingleDeviceSharding  # noqa: PLC0415
    row = jax.ShapeDtypeStruct((1024,), jnp.float32, sharding=SingleDeviceSharding(device))

    def oversized(x: jax.Array) -> jax.Array:  # sorts a [2**28, 1024] fp32 temporary: 1 TiB
        rows = jnp.arange(1 << 28, dtype=jnp.float32)[:, None]
        return jnp.sort(x[None, :] + rows, axis=0)[0]
    try:
        jax.jit(oversized).lower(row).compile()
    except Exception as err:  # noqa: BLE001 - the refusal is the measurement
        match = _CAPACITY.search(str(err))
        if match:
            number, unit = (match.group(1), match.group(2)) if match.group(1) else (
                match.group(3), match.group(4))
            return parse_size(number, unit)
    return None


def hbm_bytes(topology: Topology, device: Any | None = None) -> tuple[int, str]:
    """(HBM bytes per chip, where the number comes from: 'compiler' or 'nominal')."""
    if device is not None:
        measured = _probe_hbm(device)
        if measured:
            return measured, "compiler"
    return NOMINAL_HBM_GIB[topology.generation] * GIB, "nominal"
