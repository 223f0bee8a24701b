"""How the routed experts run on this mesh and platform: the config's "auto"s, resolved.

Three MoE settings depend on where the model runs; `resolve_execution` turns them into
concrete choices, validates them against the mesh, and says why (`MoEExecution.notes`):

- model.moe.expert_parallel: "gspmd" (annotations; GSPMD inserts the all-to-alls,
  capacity.py), "shard_map" (an explicit transport, parallel/shard_map.py), or "auto":
  "shard_map" for the dropless dispatch on a multi-device mesh, else "gspmd". GSPMD cannot
  shard dropless's sort (every device would gather and sort every pair of the batch,
  1.5x the step time measured on 2 CPU devices), so an explicit "gspmd" with "dropless"
  on a multi-device mesh is a config error, never silently overridden. Without a mesh
  (one device) every setting runs the plain dispatch.
- model.moe.expert_transport (shard_map only): "all_gather" (runs everywhere, what the
  tests run), "ragged" (`jax.lax.ragged_all_to_all`; tests run it emulated on CPU and
  lower the native collective, it has not run on a GPU/TPU in this repository), or
  "auto": "ragged" on GPU/TPU, "all_gather" elsewhere. Choosing "ragged" by "auto" is
  logged as a warning.
- model.moe.dropless_backend (dropless only): "auto" is "ragged_dot" on GPU/TPU and "bulk"
  on XLA:CPU (dropless.expert_backend).

shard_map's varying-axis type check (`check_vma`) is off where the local computation is
dropless or the transport is ragged: their loops and custom VJPs are not typed for it
(see parallel/shard_map.py); tests/test_expert_parallel.py holds their values and
gradients against the GSPMD path instead. `build_model` resolves and logs the choices once
per model (`log_execution`); the MoE layers compute the same pure function when traced.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
from jax.sharding import Mesh

from moejax.config import EXPERT_TRANSPORTS
from moejax.model.moe.dropless import expert_backend

log = logging.getLogger(__name__)
RAGGED_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")  # where ragged_all_to_all has a kernel


@dataclasses.dataclass(frozen=True)
class MoEExecution:
    """The concrete way a MoE layer computes its routed experts."""
    dispatch: str  # model.moe.dispatch
    expert_parallel: str  # "gspmd" (or no mesh: plain dispatch) or "shard_map"
    transport: str | None  # shard_map: "all_gather" or "ragged"; else None
    dropless_backend: str | None  # dropless: "ragged_dot", "bulk" or "loop"; else None
    check_vma: bool  # shard_map's varying-axis check (always True off shard_map)
    platform: str
    notes: tuple[str, ...] = ()  # why each "auto" resolved as it did
    warnings: tuple[str, ...] = ()  # choices a user should know about

    def describe(self) -> str:
        parts = [f"dispatch={self.dispatch}", f"expert_parallel={self.expert_parallel}"]
        if self.transport:
            parts.append(f"expert_transport={self.transport}")
        if self.dropless_backend:
            parts.append(f"dropless_backend={self.dropless_backend}")
        if self.expert_parallel == "shard_map":
            parts.append(f"check_vma={self.check_vma}")
        return f"MoE on {self.platform}: " + ", ".join(parts)


def vma_checked(transport: str, local_dispatch: str) -> bool:
    """Whether shard_map checks varying axes: not for ragged or dropless local work."""
    return not (transport == "ragged" or local_dispatch == "dropless")


def resolve_execution(dispatch: str, expert_parallel: str = "auto", transport: str = "auto",
                      dropless_backend: str = "auto", mesh: Mesh | None = None,
                      platform: str | None = None) -> MoEExecution:
    """The MoEExecution of these model.moe settings on `mesh` (None: no mesh is active).

    Raises ValueError naming the field and the fix for a choice the mesh cannot honour.
    """
    if platform is None:
        platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    if transport not in EXPERT_TRANSPORTS:
        raise ValueError(f"model.moe.expert_transport={transport!r}: use one of "
                         f"{list(EXPERT_TRANSPORTS)}.")
    notes: list[str] = []
    warnings: list[str] = []
    multi = mesh is not None and mesh.size > 1
    backend = None
    if dispatch == "dropless":
        backend = expert_backend(platform) if dropless_backend == "auto" else dropless_backend
        if dropless_backend == "auto":
            notes.append(f"dropless_backend 'auto' -> {backend!r} on {platform}")
    if expert_parallel == "gspmd" and dispatch == "dropless" and multi:
        raise ValueError(
            f"model.moe.expert_parallel='gspmd' cannot run model.moe.dispatch='dropless' on "
            f"a {mesh.size}-device mesh: GSPMD does not shard its sort, so every device "
            "would sort every pair of the batch. Set model.moe.expert_parallel='shard_map' "
            "(or 'auto', which picks it), or use model.moe.dispatch='index'.")
    if mesh is None:
        parallel = "gspmd"
        if expert_parallel == "shard_map":
            notes.append("expert_parallel 'shard_map' without a mesh: the plain dispatch")
    elif expert_parallel == "auto":
        parallel = "shard_map" if dispatch == "dropless" and multi else "gspmd"
        notes.append(f"expert_parallel 'auto' -> {parallel!r}")
    else:
        parallel = expert_parallel
    mode, check_vma = None, True
    if parallel == "shard_map":
        mode = transport
        if transport == "auto":
            mode = "ragged" if platform in RAGGED_PLATFORMS else "all_gather"
            notes.append(f"expert_transport 'auto' -> {mode!r} on {platform}")
            if mode == "ragged":
                warnings.append(
                    f"model.moe.expert_transport='auto' picked 'ragged' on {platform}: "
                    "ragged_all_to_all is tested emulated on CPU and lowered, never run on "
                    "an accelerator here; set model.moe.expert_transport='all_gather' for "
                    "the transport the tests run.")
        check_vma = vma_checked(mode, dispatch)
        if not check_vma:
            notes.append("shard_map check_vma off (dropless / ragged local work is not "
                         "typed for it; values and gradients are tested instead)")
    return MoEExecution(dispatch, parallel, mode, backend, check_vma, platform,
                        tuple(notes), tuple(warnings))


def execution_of(moe: Any, mesh: Mesh | None) -> MoEExecution:
    """`resolve_execution` of a MoEConfig / V4MoEConfig on `mesh`."""
    return resolve_execution(moe.dispatch, moe.expert_parallel, moe.expert_transport,
                             moe.dropless_backend, mesh)


_logged: set[MoEExecution] = set()


def log_execution(execution: MoEExecution) -> None:
    """One INFO line with the choices and why; a WARNING per choice worth knowing (each
    distinct execution once per process)."""
    if execution in _logged:
        return
    _logged.add(execution)
    why = f" ({'; '.join(execution.notes)})" if execution.notes else ""
    log.info("%s%s", execution.describe(), why)
    for warning in execution.warnings:
        log.warning("%s", warning)
