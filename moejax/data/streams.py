"""The global batch as `data.streams` packing streams; a process reads only its rows.

The training data is one global sequence of batches, defined without reference to the
number of processes: the shuffled, repeated document sequence is dealt round-robin into S
= `data.streams` streams (stream s takes documents s, s + S, s + 2S, ...); each stream
packs its documents into rows and contributes `batch_size / S` consecutive rows to every
global batch (stream 0 rows [0, R), stream 1 rows [R, 2R), ..., R = batch_size / S).

A process needs the rows of the global batch that its devices hold (`rows`, from the batch
sharding); it runs only the streams that hold those rows and keeps those rows. So the
global batch at step s is the same whatever the number of processes, and a run resumes on
a different number of hosts: the checkpointed state is every stream's state (gathered to
the primary process at save), and each process restores the streams it reads.

Work per process: the streams holding its rows. With S a multiple of the process count
(and contiguous rows per process), each process packs 1/P of the data; with S = 1 (the
default) every process packs the whole batch and keeps its share.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import grain
import numpy as np

from moejax.distributed import allgather_json

Batch = dict[str, np.ndarray]


def check_rows(rows: Sequence[int], global_batch_size: int) -> np.ndarray:
    """`rows` as a sorted int array of distinct global row indices (ValueError if bad)."""
    out = np.asarray(sorted(set(int(r) for r in rows)), dtype=np.int64)
    if out.size == 0 or out[0] < 0 or out[-1] >= global_batch_size:
        raise ValueError(f"rows {list(rows)[:8]}... must be a non-empty subset of "
                         f"range(train.batch_size={global_batch_size}).")
    return out


def contiguous_rows(global_batch_size: int, process_index: int, process_count: int
                    ) -> np.ndarray:
    """Rows [p * B/P, (p+1) * B/P): process p's share when the batch is split in order."""
    per = global_batch_size // process_count
    return np.arange(process_index * per, (process_index + 1) * per)


class GlobalBatchIterator:
    """This process's rows of the global batches, from the streams that hold them.

    `streams[s]` is an iterator of stream s's [R, L] blocks. Yields {"tokens",
    "segment_ids", "positions"}: int32 [len(rows), L], rows in increasing global order.
    `get_state` / `set_state` are JSON-able and keyed by stream index.
    """

    def __init__(self, streams: Mapping[int, Any], rows_per_stream: int, rows: np.ndarray):
        self.streams = dict(sorted(streams.items()))
        self.rows_per_stream = rows_per_stream
        self.rows = rows
        order = {s: i for i, s in enumerate(self.streams)}
        # position of each wanted global row inside the concatenated blocks of our streams
        self._take = np.asarray([order[r // rows_per_stream] * rows_per_stream
                                 + r % rows_per_stream for r in rows], dtype=np.int64)

    def __iter__(self) -> "GlobalBatchIterator":
        return self

    def __next__(self) -> Batch:
        blocks = [next(it) for it in self.streams.values()]
        if len(blocks) == 1 and len(self._take) == self.rows_per_stream:
            return blocks[0]
        return {k: np.concatenate([b[k] for b in blocks])[self._take] for k in blocks[0]}

    def get_state(self) -> dict[str, Any]:
        return {"rows_per_stream": self.rows_per_stream,
                "streams": {str(s): it.get_state() for s, it in self.streams.items()}}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("rows_per_stream") != self.rows_per_stream:
            raise ValueError(
                f"the saved data state has {state.get('rows_per_stream')} rows per stream, "
                f"this run {self.rows_per_stream}: keep train.batch_size and data.streams "
                "of the run that wrote the checkpoint.")
        missing = [s for s in self.streams if str(s) not in state["streams"]]
        if missing:
            raise ValueError(f"the saved data state has no stream(s) {missing}: keep "
                             "data.streams of the run that wrote the checkpoint.")
        for s, it in self.streams.items():
            it.set_state(state["streams"][str(s)])

    def close(self) -> None:
        for it in self.streams.values():
            if hasattr(it, "close"):
                it.close()


def merge_states(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One state holding every stream, from the states of processes reading subsets."""
    merged = {"rows_per_stream": states[0]["rows_per_stream"], "streams": {}}
    for state in states:
        for s, stream_state in state["streams"].items():
            merged["streams"].setdefault(s, stream_state)
    return merged


def global_state(iterator: GlobalBatchIterator) -> dict[str, Any]:
    """Every stream's state, on every process (an all-gather when there are several).

    A collective: every process must call it at the same point (checkpoint saves are).
    """
    return merge_states(allgather_json(iterator.get_state()))


def stream_dataset(documents: grain.MapDataset, stream: int, num_streams: int
                   ) -> grain.MapDataset:
    """Stream `stream`'s documents: positions stream, stream + S, ... of `documents`."""
    return documents[stream::num_streams]
