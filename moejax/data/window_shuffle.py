"""Window shuffle of packed rows: each window of W consecutive rows comes out permuted.

Packing cuts a document into consecutive rows, so without a shuffle a batch holds several
rows of the same long file (correlated gradients). `WindowShuffle(parent, W, seed)` reads
W rows, then yields them in the order of a permutation drawn from
`np.random.default_rng([seed..., window index])`: a fixed, reproducible permutation
within each window, never mixing windows (W = 0 or 1: rows pass through unchanged).

Checkpoint state: the parent's state at the start of the current window, the window index
and how many of its rows were already yielded. A restore rewinds the parent to the
window's start, re-reads the window and skips the yielded rows, so the rows after a
restore are bitwise those of an uninterrupted run (re-reading costs at most W rows).
"""
from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np


class WindowShuffleIterator(grain.DatasetIterator):
    """Rows of `parent` permuted within consecutive windows of `window` rows."""

    def __init__(self, parent: grain.DatasetIterator, window: int, seed: Sequence[int]):
        super().__init__(parent)
        self._window_size = window
        self._seed = [int(s) for s in seed]
        self._index = 0  # window being yielded (or the next one to read)
        self._start_state: Any = None  # parent state at the start of window `_index`
        self._rows: list[Any] = []  # the window's rows, in permuted order; [] = not read
        self._pos = 0  # rows of the window already yielded

    def _read_window(self) -> None:
        self._start_state = self._parent.get_state()
        rows = []
        for _ in range(self._window_size):
            try:
                rows.append(next(self._parent))
            except StopIteration:
                break
        if not rows:
            raise StopIteration
        order = np.random.default_rng([*self._seed, self._index]).permutation(len(rows))
        self._rows = [rows[i] for i in order]

    def __next__(self) -> Any:
        if self._window_size <= 1:
            return next(self._parent)
        if not self._rows:
            self._read_window()
        row = self._rows[self._pos]
        self._pos += 1
        if self._pos == len(self._rows):  # window done: the next call reads a fresh one
            self._rows, self._pos, self._index = [], 0, self._index + 1
        return row

    def get_state(self) -> dict[str, Any]:
        parent = self._start_state if self._rows else self._parent.get_state()
        return {"parent": parent, "window": self._index, "position": self._pos}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._index, self._pos, self._rows = int(state["window"]), 0, []
        position = int(state["position"])
        if position:
            self._read_window()
            self._pos = position


class WindowShuffle(grain.IterDataset):
    """`WindowShuffleIterator` over the iterators of `parent` (see the module doc)."""

    def __init__(self, parent: grain.IterDataset, window: int, seed: Sequence[int]):
        super().__init__(parent)
        self._window_size = window
        self._seed = tuple(seed)

    def __iter__(self) -> WindowShuffleIterator:
        return WindowShuffleIterator(self._parent.__iter__(), self._window_size, self._seed)
