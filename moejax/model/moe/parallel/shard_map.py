"""Expert parallelism with an explicit transport: a `jax.shard_map` around the routed experts.

The annotation-only path ("gspmd", ../capacity.py) lets GSPMD insert the all-to-all where the
capacity buffers are constrained to `act_expert`. Here the schedule is written out. With
n = mesh.expert, each `expert` shard holds E_l = E / n experts (weights [E_l, D, F]; F is
further split over `tensor` when tensor > 1) and its own tokens [G_l, S, D] (the token
groups stay split over the batch axes (data, fsdp, expert) exactly as `act_batch` says).

Transport "all_gather" (runs everywhere, the CPU default):
    xs   = all_gather(x, expert)              [n G_l, S, D]  (tokens + routing of the group)
    y    = local experts on xs                 [n G_l, S, D]  (pairs of other shards' experts
                                                               are masked out; zero rows)
    y    = psum(y, tensor)                     (partial sums over the F slices, if tensor > 1)
    out  = psum_scatter(y, expert)             [G_l, S, D]    (each token back to its owner)
The local computation follows `model.moe.dispatch`, restricted to the local experts:
- "index": the same capacity C = ceil(cf * S * T / E), the same choice-major slot order
  and therefore exactly the same dropped pairs as `experts.index_dispatch`; cf <= 0 gives
  C = S (never drops, but every local expert then computes S rows per group).
- "dropless": `dropless.dropless_dispatch` on the gathered pairs, the pairs of other
  shards' experts given the padding id E_l (sorted last, never computed). Nothing drops;
  the grouped matmul only visits the local pairs.
Cost per shard and direction: (n-1) G_l S D values moved, against (n-1)/n cf T G_l S D
for the all-to-all of capacity buffers, so fewer bytes while n < cf T. But the routing
bookkeeping (slot assignment or sort, gathers, combine) runs on all n G_l gathered groups
on every shard, n times the dispatch work of the GSPMD path; only the expert matmuls are
split (bench/README.md has the measurement).

Transport "ragged" (GPU/TPU; emulated by all-gathers elsewhere, for tests): pairs are
sorted by destination expert, exchanged with `jax.lax.ragged_all_to_all`, computed
dropless (../dropless.py's grouped matmul: ragged_dot on gpu/tpu) and sent back; see
ragged_exchange.py. "auto" picks "ragged" on gpu/tpu (logged as a warning: it has run only
emulated) and "all_gather" elsewhere; ../execution.py resolves and logs the choice.

If the token groups do not divide over the expert axis (logical_to_spec then keeps them
whole on it), each expert shard already holds the whole group: no gather, and the final
reduce-scatter becomes a psum.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from moejax.model.moe.dropless import dropless_dispatch
from moejax.model.moe.capacity import (DISPATCH, DispatchFn, assign_slots, capacity,
                                       choice_major, combine_from_slots, gather_to_slots)
from moejax.model.moe.execution import (RAGGED_PLATFORMS, MoEExecution, resolve_execution,
                                        vma_checked)
from moejax.model.moe.experts import ExpertWeights, expert_swiglu
from moejax.model.moe.parallel.ragged_exchange import ragged_shard
from moejax.sharding import logical_to_spec

LOCAL_DISPATCHES = ("index", "dropless")  # what each expert shard runs on its pairs


def resolve_transport(transport: str, mesh: Mesh) -> str:
    """"auto" -> "ragged" where ragged_all_to_all lowers (gpu/tpu), else "all_gather"
    (`execution.resolve_execution`, which MoE layers resolve and log at build)."""
    return resolve_execution("index", "shard_map", transport, mesh=mesh).transport


def local_index_experts(x: jax.Array, indices: jax.Array, weights: jax.Array,
                        mask: jax.Array, expert_weights: ExpertWeights, first: jax.Array,
                        c: int, swiglu_limit: float) -> tuple[jax.Array, jax.Array]:
    """index dispatch over experts [first, first + E_l) only; other pairs contribute zero.

    x [G, S, D], indices/weights [G, S, T] (global expert ids), mask [G, S]. A pair's slot
    in its expert's queue only depends on the pairs of that expert, so queueing the
    non-local pairs behind a virtual expert E_l leaves every local slot as in the global
    index dispatch. Returns (partial out [G, S, D], dropped local pairs).
    """
    g, s, d = x.shape
    e_local, top_k = expert_weights[0].shape[0], indices.shape[-1]
    real = jnp.broadcast_to(mask[:, None, :], (g, top_k, s)).reshape(g, -1) > 0
    local = choice_major(indices) - first  # [G, T*S]
    mine = real & (local >= 0) & (local < e_local)
    slot, keep = assign_slots(jnp.where(mine, local, e_local), mine, e_local, c)
    buffers = gather_to_slots(x, slot, e_local * c, top_k)
    y = expert_swiglu(buffers.reshape(g, e_local, c, d), expert_weights, swiglu_limit)
    return combine_from_slots(y.reshape(g, e_local * c, d), slot, weights), (mine & ~keep).sum()


def local_dropless_experts(x: jax.Array, indices: jax.Array, weights: jax.Array,
                           mask: jax.Array, expert_weights: ExpertWeights, first: jax.Array,
                           swiglu_limit: float, backend: str | None = None
                           ) -> tuple[jax.Array, jax.Array]:
    """dropless dispatch over experts [first, first + E_l); other pairs get the padding id."""
    e_local = expert_weights[0].shape[0]
    local = indices - first
    local = jnp.where((local >= 0) & (local < e_local), local, e_local)
    return dropless_dispatch(x, local, weights, mask, expert_weights, 0.0, swiglu_limit,
                             backend)


def _all_gather_shard(x: jax.Array, indices: jax.Array, weights: jax.Array, mask: jax.Array,
                      gate: jax.Array, up: jax.Array, down: jax.Array, *, c: int,
                      local: str, swiglu_limit: float, gather: bool, tensor: bool,
                      batch_axes: tuple[str, ...], dropless_backend: str | None
                      ) -> tuple[jax.Array, jax.Array]:
    """Per-shard body of the all_gather transport (see the module docstring)."""
    if gather:
        x, indices, weights, mask = (jax.lax.all_gather(a, "expert", axis=0, tiled=True)
                                     for a in (x, indices, weights, mask))
    first = jax.lax.axis_index("expert") * gate.shape[0]
    if local == "dropless":
        out, dropped = local_dropless_experts(x, indices, weights, mask, (gate, up, down),
                                              first, swiglu_limit, dropless_backend)
    else:
        out, dropped = local_index_experts(x, indices, weights, mask, (gate, up, down), first,
                                           c, swiglu_limit)
    if tensor:
        out = jax.lax.psum(out, "tensor")
    if gather:
        out = jax.lax.psum_scatter(out, "expert", scatter_dimension=0, tiled=True)
    else:
        out = jax.lax.psum(out, "expert")
    dropped = jax.lax.psum(dropped, tuple(dict.fromkeys((*batch_axes, "expert"))))
    return out, dropped


def _batch_axes(spec: PartitionSpec) -> tuple[str, ...]:
    axes = spec[0]
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def expert_parallel_dispatch(x: jax.Array, indices: jax.Array, weights: jax.Array,
                             mask: jax.Array, expert_weights: ExpertWeights,
                             capacity_factor: float, swiglu_limit: float = 0.0, *,
                             mesh: Mesh, transport: str = "auto", local: str = "index",
                             dropless_backend: str | None = None
                             ) -> tuple[jax.Array, jax.Array]:
    """The dispatch contract of capacity.py, computed per expert shard under shard_map.

    x [G, S, D], indices/weights [G, S, T], mask [G, S], expert weights gate/up [E, D, F],
    down [E, F, D] -> (out [G, S, D], dropped pairs). Needs E % mesh.expert == 0 and, when
    mesh.tensor > 1, F % mesh.tensor == 0 (the F slices are summed by a psum over tensor).
    `local` ("index" or "dropless") is the per-shard computation of the all_gather
    transport; the ragged transport is always dropless up to its receive buffer.
    `dropless_backend` is dropless_dispatch's `backend` for the local experts (None: by
    platform).
    """
    if local not in LOCAL_DISPATCHES:
        raise ValueError(f"expert parallelism computes {list(LOCAL_DISPATCHES)} per shard, "
                         f"not {local!r}; set model.moe.dispatch to one of them.")
    g, s, _ = x.shape
    num_experts, f = expert_weights[0].shape[0], expert_weights[0].shape[-1]
    n, t = mesh.shape["expert"], mesh.shape["tensor"]
    if num_experts % n:
        raise ValueError(f"expert parallelism: num_experts={num_experts} must be divisible "
                         f"by mesh.expert={n}; change either.")
    if t > 1 and f % t:
        raise ValueError(f"expert parallelism: expert_hidden={f} must be divisible by "
                         f"mesh.tensor={t}; change either.")
    tok = logical_to_spec(("act_batch", None, None), shape=(g, s, 1), mesh=mesh)
    batch_axes = _batch_axes(tok)
    gather = "expert" in batch_axes
    mode = resolve_transport(transport, mesh)
    f_axis = "tensor" if t > 1 else None
    w_in, w_out = PartitionSpec("expert", None, f_axis), PartitionSpec("expert", f_axis, None)
    ragged = mode == "ragged" and gather
    if ragged:
        body = functools.partial(ragged_shard, num_experts=num_experts,
                                 capacity_factor=capacity_factor, swiglu_limit=swiglu_limit,
                                 tensor=t > 1, batch_axes=batch_axes,
                                 native=_native_ragged(mesh), backend=dropless_backend)
    else:  # all_gather, or tokens already whole on the expert axis (then no gather, a psum)
        c = capacity(s, indices.shape[-1], num_experts, capacity_factor)
        body = functools.partial(_all_gather_shard, c=c, local=local,
                                 swiglu_limit=swiglu_limit, gather=gather, tensor=t > 1,
                                 batch_axes=batch_axes, dropless_backend=dropless_backend)
    # dropless.py's loops and custom VJPs are not typed for shard_map's varying-axis check
    # (loop carries start invariant, weight cotangents come back varying over the batch
    # axes); without the check, shard_map's transpose psums them (tests hold the grads).
    fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, PartitionSpec(*tok[:2]),
                                                  w_in, w_in, w_out),
                       out_specs=(tok, PartitionSpec()),
                       check_vma=vma_checked("ragged" if ragged else "all_gather", local))
    return fn(x, indices, weights, mask, *expert_weights)


def _native_ragged(mesh: Mesh) -> bool:
    return mesh.devices.flat[0].platform in RAGGED_PLATFORMS


def select_dispatch(execution: MoEExecution, mesh: Mesh | None) -> DispatchFn:
    """The dispatch function a MoE layer calls for a resolved `execution` (execution.py):
    DISPATCH[dispatch] (dropless with its backend), or this file's shard_map path on
    `mesh` when execution.expert_parallel == "shard_map"."""
    if mesh is None or execution.expert_parallel != "shard_map":
        if execution.dispatch == "dropless":
            return functools.partial(DISPATCH["dropless"], backend=execution.dropless_backend)
        return DISPATCH[execution.dispatch]
    return functools.partial(expert_parallel_dispatch, mesh=mesh, transport=execution.transport,
                             local=execution.dispatch,
                             dropless_backend=execution.dropless_backend)
