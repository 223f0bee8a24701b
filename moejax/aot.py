"""Compile the train step for a TPU topology you do not have, and say whether it fits.

    python -m moejax.aot --config configs/deepseek_v4.py:flash --topology v5p-512 \\
        --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.expert=8 [--json]
    python -m moejax.aot --config configs/tiny.py --topology v5p:2x2x1 --num-slices 2

Needs libtpu (`pip install -e ".[tpu]"`); runs on a CPU-only machine (JAX_PLATFORMS=cpu
is set unless JAX_PLATFORMS says otherwise). The topology is a product name (v4-N and v5p-N
count TensorCores, two a chip; v5e-N and v6e-N count chips) or a chip grid ('v5p:8x8x4'),
see moejax.topology. The step is the one train.py runs: `make_mesh` over the topology's
devices, `make_setup`, `make_guarded_step` (the train step inside the non-finite guard),
lowered with abstract arguments (the state's `ShapeDtypeStruct`s with their shardings,
the guard's scalars, a batch with the batch sharding, the seed key)
and compiled by XLA:TPU. Nothing is allocated.

Reported per chip, from `compiled.memory_analysis()`: arguments (the train state and the
batch), temporaries, outputs, generated code, and
total = arguments + outputs - aliased (the donated state is written in place) +
temporaries + generated code, against the chip's HBM (as XLA:TPU reports it, see
`moejax.topology.hbm_bytes`); host-offloaded bytes (the host_* fields); the step's FLOPs
from `moejax.plan` (training FLOPs per token x tokens per step; XLA's `cost_analysis()`
counts a while loop's body once, so it is no step estimate for a scanned model and is not
shown); the collectives of the optimized HLO by kind (moejax.hlo_stats: loop bodies times
their trip counts) and the compile time. A program XLA refuses (RESOURCE_EXHAUSTED) is a
result too: the bytes it asked for are reported and the exit status is 1, as it is for a
program that compiles but does not fit the chip's HBM (XLA:TPU compiles some of those).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from typing import Any, Sequence

import ml_collections

from moejax.config import MESH_AXES, load_config, resolve
from moejax.hlo_stats import collective_stats
from moejax.plan import plan
from moejax.sharding import ici_device_grid, make_mesh, mesh_shape, use_mesh
from moejax.topology import (
    GIB,
    Topology,
    hbm_bytes,
    parse_size,
    parse_topology,
    topology_devices,
)
from moejax.train import batch_sharding, make_setup
from moejax.train.guard import init_guard, make_guarded_step
from moejax.train.state import abstract_key

JSON_KEYS = ("config", "topology", "num_slices", "chips", "mesh", "tokens_per_step",
             "state_bytes_per_chip", "temp_bytes_per_chip", "output_bytes_per_chip",
             "alias_bytes_per_chip", "code_bytes_per_chip", "total_bytes_per_chip",
             "hbm_bytes_per_chip", "hbm_source", "host_bytes_per_chip", "fits",
             "plan_flops_per_step", "collective_bytes", "collective_counts",
             "unknown_trip_counts", "compile_seconds", "error", "required_bytes_per_chip")
_REQUIRED = (r"required for ([^(]+?)\s*\(([\d.]+)([KMGT]?)\)", r"HLO temporaries\s*\(([\d.]+)([KMGT]?)\)",
             r"Used ([\d.]+)([KMGT]?) of [\d.]+[KMGT]? hbm")


@dataclasses.dataclass
class AotResult:
    """What `compile_train_step` found. Byte counts are per chip, for one train step."""
    config: str
    topology: str  # libtpu's name, e.g. 'v5p:4x8x8'
    num_slices: int
    chips: int  # all slices
    mesh: dict[str, int]
    tokens_per_step: int
    hbm_bytes_per_chip: int
    hbm_source: str  # 'compiler' or 'nominal'
    plan_flops_per_step: float  # moejax.plan: training FLOPs per token x tokens per step
    compile_seconds: float
    state_bytes_per_chip: int = 0  # arguments: the train state (+ the batch and the key)
    temp_bytes_per_chip: int = 0
    output_bytes_per_chip: int = 0
    alias_bytes_per_chip: int = 0  # outputs written into donated arguments
    code_bytes_per_chip: int = 0
    total_bytes_per_chip: int = 0
    host_bytes_per_chip: int = 0  # offloaded to host memory
    fits: bool = False
    collective_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    collective_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    unknown_trip_counts: int = 0  # loops counted once (data-dependent bound)
    error: str | None = None  # XLA's refusal, when it did not compile
    required_bytes_per_chip: int | None = None  # what the refusal says was needed

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in JSON_KEYS}


def _ordered_devices(mesh_cfg: Any, devices: list[Any]) -> list[Any]:
    """One slice: the devices in ICI-topology-aware mesh order (`create_device_mesh`),
    flattened, so that `make_mesh`'s reshape gives that grid. Several slices: as given
    (make_mesh builds the hybrid ICI x DCN mesh from their slice indices)."""
    if len({getattr(d, "slice_index", 0) for d in devices}) > 1:
        return devices
    sizes = mesh_shape(mesh_cfg, len(devices))
    return list(ici_device_grid(tuple(sizes[a] for a in MESH_AXES), devices).flat)


def abstract_batch(cfg: Any, mesh: Any) -> dict[str, Any]:
    """The train step's batch as ShapeDtypeStructs with the batch sharding."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    t = cfg.train
    rows = batch_sharding(mesh, t.batch_size, t.seq_len)
    return {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32, sharding=rows)
            for k in ("tokens", "segment_ids", "positions")}


def required_bytes(message: str) -> int | None:
    """The bytes an XLA:TPU RESOURCE_EXHAUSTED message says the program needs."""
    for pattern in _REQUIRED:
        match = re.search(pattern, message)
        if match:
            number, unit = match.groups()[-2:]
            return parse_size(number, unit)
    return None


def _memory(result: AotResult, compiled: Any) -> None:
    stats = compiled.memory_analysis()
    result.state_bytes_per_chip = stats.argument_size_in_bytes
    result.temp_bytes_per_chip = stats.temp_size_in_bytes
    result.output_bytes_per_chip = stats.output_size_in_bytes
    result.alias_bytes_per_chip = stats.alias_size_in_bytes
    result.code_bytes_per_chip = stats.generated_code_size_in_bytes
    result.total_bytes_per_chip = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                                   - stats.alias_size_in_bytes + stats.temp_size_in_bytes
                                   + stats.generated_code_size_in_bytes)
    result.host_bytes_per_chip = (stats.host_argument_size_in_bytes
                                  + stats.host_output_size_in_bytes
                                  - stats.host_alias_size_in_bytes
                                  + stats.host_temp_size_in_bytes)
    result.fits = result.total_bytes_per_chip <= result.hbm_bytes_per_chip


def compile_train_step(config: ml_collections.ConfigDict, topology: str | Topology, num_slices: int = 1,
                       name: str = "") -> AotResult:
    """Compiles train.py's step for `num_slices` slices of `topology`; see the module doc.

    `config`: an experiment ConfigDict (`moejax.load_config`; resolved and validated here).
    A compile refused for memory returns a result with `error` set and `fits` False; other
    failures (a mesh that does not match the chips, a bad config) raise.
    """
    import jax  # noqa: PLC0415
    from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415

    cfg = resolve(config)
    topo = topology if isinstance(topology, Topology) else parse_topology(topology)
    devices = topology_devices(topo, num_slices)
    mesh = make_mesh(cfg.mesh, _ordered_devices(cfg.mesh, devices))
    hbm, source = hbm_bytes(topo, devices[0])
    flops = plan(config)["flops_per_token"]
    result = AotResult(
        config=name, topology=topo.topology_name, num_slices=num_slices, chips=len(devices),
        mesh=dict(mesh.shape), tokens_per_step=cfg.train.batch_size * cfg.train.seq_len,
        hbm_bytes_per_chip=hbm, hbm_source=source,
        plan_flops_per_step=flops * cfg.train.batch_size * cfg.train.seq_len,
        compile_seconds=0.0)
    start = time.perf_counter()
    with use_mesh(mesh):
        setup = make_setup(cfg, mesh)
        step = make_guarded_step(setup, cfg)  # train.py's step: the non-finite guard around it
        replicated = NamedSharding(mesh, PartitionSpec())
        key = abstract_key()
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
        guard = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                            sharding=replicated),
                             init_guard(cfg))
        lowered = step.lower(setup.abstract, guard, abstract_batch(cfg, mesh), key)
        # a compile-only executable cannot be stored in or read from the persistent cache
        cache = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        try:
            compiled = lowered.compile()
        except Exception as err:  # noqa: BLE001 - XLA's refusal is the answer
            if "RESOURCE_EXHAUSTED" not in str(err):
                raise
            result.compile_seconds = time.perf_counter() - start
            result.error = str(err).strip().splitlines()[0]
            result.required_bytes_per_chip = required_bytes(str(err))
            return result
        finally:
            jax.config.update("jax_enable_compilation_cache", cache)
    result.compile_seconds = time.perf_counter() - start
    _memory(result, compiled)
    stats = collective_stats(compiled.as_text())
    result.collective_bytes, result.collective_counts = stats.bytes, stats.counts
    result.unknown_trip_counts = stats.unknown_trip_counts
    return result


def _gib(n: float | None) -> str:
    """Bytes in GiB, or MiB below 1 GiB."""
    if n is None:
        return "?"
    return f"{n / GIB:,.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:,.2f} MiB"


def format_result(r: AotResult) -> str:
    """The human-readable report."""
    slices = f" x {r.num_slices} slices" if r.num_slices > 1 else ""
    lines = [f"{r.config or 'config'} on {r.topology}{slices}: {r.chips} chips, mesh "
             + " x ".join(f"{a} {s}" for a, s in r.mesh.items()),
             f"tokens per step       {r.tokens_per_step:,} "
             f"({r.tokens_per_step / r.chips:,.0f} per chip)",
             f"FLOPs per step        {r.plan_flops_per_step:.4g} (moejax.plan; "
             f"{r.plan_flops_per_step / r.chips:.4g} per chip)",
             f"compile time          {r.compile_seconds:.1f} s"]
    hbm = f"{_gib(r.hbm_bytes_per_chip)} ({r.hbm_source})"
    if r.error is not None:
        lines += [f"XLA refused it:       {r.error}",
                  f"required per chip     {_gib(r.required_bytes_per_chip)}  vs HBM {hbm}"]
        return "\n".join(lines)
    margin = r.hbm_bytes_per_chip - r.total_bytes_per_chip
    verdict = (f"fits, {_gib(margin)} free ({margin / r.hbm_bytes_per_chip:.0%})" if r.fits
               else f"DOES NOT FIT: {_gib(-margin)} over")
    lines += ["per chip:",
              f"  arguments (state)   {_gib(r.state_bytes_per_chip)}",
              f"  temporaries         {_gib(r.temp_bytes_per_chip)}",
              f"  outputs             {_gib(r.output_bytes_per_chip)} "
              f"({_gib(r.alias_bytes_per_chip)} aliased to donated arguments)",
              f"  generated code      {_gib(r.code_bytes_per_chip)}",
              f"  total               {_gib(r.total_bytes_per_chip)} of {hbm}: {verdict}",
              f"  host-offloaded      {_gib(r.host_bytes_per_chip)}",
              "collectives per step (per chip; loop bodies x trip count):"]
    for kind in sorted(r.collective_bytes, key=r.collective_bytes.get, reverse=True):
        lines.append(f"  {kind:20s}{r.collective_counts[kind]:>8,} ops "
                     f"{_gib(r.collective_bytes[kind]):>14}")
    if r.unknown_trip_counts:
        lines.append(f"  ({r.unknown_trip_counts} loops with a data-dependent trip count "
                     "counted once)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moejax.aot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/x.py[:arg]")
    parser.add_argument("--topology", required=True, help="v5p-512, v5e-16, v5p:8x8x4, ...")
    parser.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not re.match(r"^--config\.[\w.]+=", a)]
    if bad:
        parser.error(f"unrecognised arguments {bad}; overrides look like --config.a.b=value")
    if not os.environ.get("JAX_PLATFORMS"):
        import jax  # noqa: PLC0415
        jax.config.update("jax_platforms", "cpu")  # compile for TPUs, run nothing
    try:
        cfg = load_config(args.config, [a[len("--config."):] for a in rest])
        result = compile_train_step(cfg, args.topology, args.num_slices, name=args.config)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"moejax.aot: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json()) if args.json else format_result(result))
    return 0 if result.error is None and result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
