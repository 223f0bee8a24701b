"""Host copies of (possibly multi-process) jax.Arrays, one tensor at a time, for export.

The exporters (hf.save, hf_v4.save) are numpy code that walks the variables layer by layer
and expert by expert (`p["moe"]["gate"][e].T`). Wrapped in `HostView`s, the variables stay
on their devices while that code indexes, transposes and reshapes them (jax operations on
the sharded arrays, which every process runs alike), and only the tensor numpy finally asks
for is copied to the host: `jax.device_get` when this process holds all of it, else
`multihost_utils.process_allgather` (a collective: every process must run the exporter,
and only process 0 writes). So an export holds one tensor on the host (plus the writer's
pending shard), never the model.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def to_numpy(x: Any) -> np.ndarray:
    """A host copy of one array (gathered over processes when it spans several)."""
    if isinstance(x, HostView):
        x = x.array
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


class HostView:
    """A jax.Array whose numpy conversion (`np.asarray`) copies it to the host."""

    def __init__(self, array: Any) -> None:
        self.array = array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def ndim(self) -> int:
        return len(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def T(self) -> "HostView":  # noqa: N802 - numpy's name
        return HostView(self.array.T)

    def __getitem__(self, index: Any) -> "HostView":
        return HostView(self.array[index])

    def reshape(self, *shape: Any) -> "HostView":
        return HostView(self.array.reshape(*shape))

    def transpose(self, *perm: Any) -> "HostView":
        return HostView(self.array.transpose(*perm))

    def astype(self, dtype: Any) -> np.ndarray:
        return to_numpy(self).astype(dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = to_numpy(self)
        return array if dtype is None else array.astype(dtype)


def host_views(tree: Any) -> Any:
    """`tree` with every jax.Array leaf wrapped in a HostView (numpy leaves unchanged)."""
    return jax.tree.map(lambda x: HostView(x) if isinstance(x, jax.Array) else x, tree)
