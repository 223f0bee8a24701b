"""Symbolic views of checkpoint tensors: which box of a HF tensor a box of a moejax leaf needs.

The HF -> moejax conversion rules (hf_names.py, hf_v4.py) are numpy code: transposes
(`w.T`, `w.transpose(0, 2, 1)`), reshapes that split one axis into several
(`[H*K, D] -> [H, K, D]`), basic slices (`w[:c]`, `w[:, :f]`) and casts. Called with a
`LazyView` instead of an array, the same rules record those operations without reading
anything, so the streaming import and the whole-model import share one mapping.

`source_box(view, box)` runs the recorded operations backwards: the box of the source tensor
that covers `box` of the view. A split axis is widened to whole rows of its inner axes,
so the source box is one rectangle (exact when the inner axes are requested whole, e.g.
whole heads). `apply(view, array, source_box, box)` replays the operations forwards on the
array read for that source box and cuts out `box`.

Boxes are tuples of (start, stop) per axis.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np

Box = tuple[tuple[int, int], ...]


class Op(NamedTuple):
    kind: str  # "transpose" | "split" | "take"
    axis: int  # split / take: the axis of the input
    arg: tuple[int, ...]  # transpose: perm; split: sizes; take: (start, stop)


class LazyView:
    """A HF tensor (`source`, logical `shape`) seen through recorded numpy operations."""

    def __init__(self, source: str, shape: Sequence[int], ops: tuple[Op, ...] = (),
                 source_shape: Sequence[int] | None = None, dtype: Any = None) -> None:
        self.source = source
        self.shape = tuple(int(s) for s in shape)
        self.ops = ops
        self.source_shape = tuple(source_shape) if source_shape is not None else self.shape
        self.dtype = dtype  # a cast the rule asked for (None: keep the tensor's values)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def _then(self, op: Op, shape: Sequence[int]) -> "LazyView":
        return LazyView(self.source, shape, self.ops + (op,), self.source_shape, self.dtype)

    @property
    def T(self) -> "LazyView":  # noqa: N802 - numpy's name
        return self.transpose(*reversed(range(self.ndim)))

    def transpose(self, *perm: Any) -> "LazyView":
        perm = tuple(perm[0]) if len(perm) == 1 and isinstance(perm[0], (tuple, list)) else perm
        if sorted(perm) != list(range(self.ndim)):
            raise ValueError(f"{self.source}: bad transpose {perm} of {self.shape}")
        return self._then(Op("transpose", 0, tuple(perm)), [self.shape[p] for p in perm])

    def reshape(self, *shape: Any) -> "LazyView":
        """Only reshapes that split axes (each input axis -> consecutive output axes)."""
        shape = list(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) \
            else list(shape)
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            shape[shape.index(-1)] = self.size // known
        if math.prod(shape) != self.size:
            raise ValueError(f"{self.source}: cannot reshape {self.shape} to {shape}")
        view, out_axis = self, 0
        for size in self.shape:
            group: list[int] = []
            while out_axis < len(shape) and (not group or math.prod(group) < size):
                group.append(shape[out_axis])
                out_axis += 1
            if math.prod(group) != size:
                raise NotImplementedError(f"{self.source}: reshape {self.shape} -> {shape} "
                                          "merges axes; only splits can be streamed.")
            if len(group) > 1:
                at = out_axis - len(group)  # earlier axes are split already
                view = view._then(Op("split", at, tuple(group)),
                                  view.shape[:at] + tuple(group) + view.shape[at + 1:])
        if out_axis != len(shape):
            raise NotImplementedError(f"{self.source}: reshape {self.shape} -> {shape} "
                                      "adds axes; only splits can be streamed.")
        return view

    def __getitem__(self, index: Any) -> "LazyView":
        index = index if isinstance(index, tuple) else (index,)
        view = self
        for axis, item in enumerate(index):
            if not isinstance(item, slice) or item.step not in (None, 1):
                raise NotImplementedError(f"{self.source}: only basic slices, not {item!r}")
            start, stop, _ = item.indices(self.shape[axis])
            if (start, stop) != (0, self.shape[axis]):
                shape = list(view.shape)
                shape[axis] = stop - start
                view = view._then(Op("take", axis, (start, stop)), shape)
        return view

    def astype(self, dtype: Any) -> "LazyView":
        return LazyView(self.source, self.shape, self.ops, self.source_shape, np.dtype(dtype))


def full_box(shape: Sequence[int]) -> Box:
    return tuple((0, int(s)) for s in shape)


def source_box(view: LazyView, box: Box) -> Box:
    """The box of the source tensor that the view's `box` is cut from (see module doc)."""
    box = list(box)
    for op in reversed(view.ops):
        if op.kind == "transpose":
            inverse = [None] * len(box)
            for i, p in enumerate(op.arg):
                inverse[p] = box[i]
            box = inverse
        elif op.kind == "take":
            lo, hi = box[op.axis]
            box[op.axis] = (lo + op.arg[0], hi + op.arg[0])
        else:  # split: whole inner rows of the first split axis' range
            inner = math.prod(op.arg[1:])
            lo, hi = box[op.axis]
            box = box[:op.axis] + [(lo * inner, hi * inner)] + box[op.axis + len(op.arg):]
    return tuple(box)


def apply(view: LazyView, array: np.ndarray, read: Box, box: Box) -> np.ndarray:
    """`box` of the view, from `array` = the source tensor's box `read` (= source_box)."""
    offsets = [lo for lo, _ in read]
    for op in view.ops:
        if op.kind == "transpose":
            array = array.transpose(op.arg)
            offsets = [offsets[p] for p in op.arg]
        elif op.kind == "take":
            offsets[op.axis] -= op.arg[0]
        else:
            inner = math.prod(op.arg[1:])
            lo, n = offsets[op.axis], array.shape[op.axis]
            assert lo % inner == 0 and n % inner == 0, (view.source, op, lo, n)
            array = array.reshape(array.shape[:op.axis] + (n // inner,) + op.arg[1:]
                                  + array.shape[op.axis + 1:])
            offsets = offsets[:op.axis] + [lo // inner] + [0] * (len(op.arg) - 1) \
                + offsets[op.axis + 1:]
    cut = tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, offsets))
    out = array[cut]
    return out.astype(view.dtype) if view.dtype is not None else out
