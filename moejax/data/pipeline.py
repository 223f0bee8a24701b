"""grain input pipeline: shuffle, tokenize, append EOS, pack, batch, shard per host.

Rows are packed with `grain.experimental.ConcatThenSplitIterDataset`: documents (each
ending in EOS, no BOS) are concatenated and cut into rows of exactly `seq_len` tokens, so
only the last row of a finite pass has padding. Per row:

  tokens       int32 token ids; `tokenizer.pad_id` where segment_ids == 0
  segment_ids  1, 2, 3, ... per document piece in the row; 0 = padding
  positions    0-based position inside the piece; a document split across rows restarts
               at 0 in the next row (each piece is its own segment)

Train: the document order is a global shuffle with `data.shuffle_seed`, redrawn each
epoch (seed + epoch), repeated forever, dealt into `data.streams` packing streams that
fill each global batch in row blocks (moejax/data/streams.py). With
`data.shuffle_window` = W > 1, each stream's packed rows are permuted within windows of W
rows (moejax/data/window_shuffle.py), so a batch does not hold runs of one document.
The global batch at step s does not depend on the number of processes: a process reads
the rows its devices hold (`rows`, default: an equal contiguous share) from the streams
that hold them. Packing runs across epoch boundaries, so no token is dropped.

Eval: one deterministic pass over the validation split in index order. Every host packs
the whole split and keeps its rows of each global batch, so every host yields the same
number of batches and the result does not depend on the host count.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import grain
import numpy as np
import orbax.checkpoint as ocp
from grain.experimental import ConcatThenSplitIterDataset

from moejax.config import DataConfig
from moejax.data.corpus import describe, make_source
from moejax.data.streams import (GlobalBatchIterator, check_rows, contiguous_rows,
                                 global_state, stream_dataset)
from moejax.data.tokenizer import Tokenizer
from moejax.data.window_shuffle import WindowShuffle

Batch = dict[str, np.ndarray]
# Reader threads per process and documents read ahead. Measured on 2 CPU cores with the
# byte tokenizer: 4/64 gives ~5M tokens/s; 8/256 halves that (GIL contention) and slows
# start-up. Raise num_threads for slow storage or GIL-releasing tokenizers (HF).
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)


class _Tokenize:
    """Document -> {"tokens": int32 ids + [eos]} (a class so worker processes can pickle it)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, doc: str) -> dict[str, np.ndarray]:
        ids = np.asarray(self.tokenizer.encode(doc), dtype=np.int32)
        return {"tokens": np.append(ids, np.int32(self.tokenizer.eos_id)).astype(np.int32)}


class _PackIterator(grain.DatasetIterator):
    """Renames ConcatThenSplit's features, pads with pad_id, and makes its state JSON-safe.

    grain 0.2.18's ConcatThenSplit compares `remainder_slices` to the tuple (-1, -1); after
    the JSON round trip of an Orbax checkpoint they are lists, and a restore then silently
    drops a document. `set_state` turns them back into tuples.
    """

    def __init__(self, parent: grain.DatasetIterator, pad_id: int):
        super().__init__(parent)
        self._pad_id = pad_id

    def __next__(self) -> Batch:
        row = next(self._parent)
        segment_ids = row["tokens_segment_ids"].astype(np.int32)
        tokens = np.where(segment_ids > 0, row["tokens"], self._pad_id).astype(np.int32)
        return {"tokens": tokens, "segment_ids": segment_ids,
                "positions": row["tokens_positions"].astype(np.int32)}

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["remainder_slices"] = {k: tuple(int(x) for x in v)
                                     for k, v in state["remainder_slices"].items()}
        self._parent.set_state(state)


class _Pack(grain.IterDataset):
    """Concat-then-split packing of {"tokens": ids} into rows of `seq_len` (see module doc)."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int):
        super().__init__(ConcatThenSplitIterDataset(parent, length_struct={"tokens": seq_len}))
        self._pad_id = pad_id

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._pad_id)


class _HostRows:
    """Keeps the given rows of a global batch (picklable for worker processes)."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows

    def __call__(self, batch: Batch) -> Batch:
        return {k: v[self.rows] for k, v in batch.items()}


def _check_shape(data_cfg: DataConfig, seq_len: int, global_batch_size: int,
                 process_index: int, process_count: int,
                 rows: Sequence[int] | None = None) -> np.ndarray:
    """Validates the batch geometry; returns this process's rows of the global batch."""
    if seq_len <= 0:
        raise ValueError(f"train.seq_len={seq_len} is invalid: must be > 0.")
    if global_batch_size <= 0:
        raise ValueError(f"train.batch_size={global_batch_size} is invalid: must be > 0.")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index}, process_count={process_count}: "
                         "need 0 <= process_index < process_count.")
    if global_batch_size % data_cfg.streams:
        raise ValueError(f"data.streams={data_cfg.streams} is invalid: must divide "
                         f"train.batch_size={global_batch_size}.")
    if not 0 <= data_cfg.shuffle_seed < 2**32:
        raise ValueError(f"data.shuffle_seed={data_cfg.shuffle_seed} is invalid: must be in "
                         "[0, 2**32).")
    if rows is not None:
        return check_rows(rows, global_batch_size)
    if global_batch_size % process_count:
        raise ValueError(f"train.batch_size={global_batch_size} is invalid: must be divisible "
                         f"by the number of processes ({process_count}).")
    return contiguous_rows(global_batch_size, process_index, process_count)


def _finish(ds: grain.IterDataset, num_workers: int) -> grain.DatasetIterator:
    if num_workers > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # grain workers read absl flags (notebooks, tests)
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(ds)


def make_train_iterator(data_cfg: DataConfig, tokenizer: Tokenizer, seq_len: int,
                        global_batch_size: int, process_index: int = 0,
                        process_count: int = 1, *, rows: Sequence[int] | None = None,
                        read_options: grain.ReadOptions | None = None,
                       ) -> GlobalBatchIterator:
    """Infinite, checkpointable iterator of this process's rows of the training batches.

    Yields {"tokens", "segment_ids", "positions"}: int32 [len(rows), seq_len], the rows
    `rows` (sorted; default: process_index's contiguous 1/process_count share) of the
    global batch, which depends only on the data config, the tokenizer, seq_len and
    global_batch_size. `get_state()` / `set_state()` are JSON-able (save with
    `iterator_checkpoint_args`); a restored iterator continues with exactly the batches the
    original would have produced, on any number of processes. With data.num_workers > 0,
    grain worker processes each pack a slice of a stream: rows depend on the worker count
    (still deterministic), a state restores only into the same worker count, and the
    caller should `close()` the iterator when done.
    """
    rows = _check_shape(data_cfg, seq_len, global_batch_size, process_index, process_count,
                        rows)
    per_stream = global_batch_size // data_cfg.streams
    source = make_source(data_cfg, "train")
    documents = grain.MapDataset.source(source).shuffle(seed=data_cfg.shuffle_seed)
    documents = documents.repeat(None)
    streams = {}
    for s in sorted(set((rows // per_stream).tolist())):
        ds = stream_dataset(documents, s, data_cfg.streams).map(_Tokenize(tokenizer))
        packed = _Pack(ds.to_iter_dataset(read_options or READ_OPTIONS), seq_len,
                       tokenizer.pad_id)
        if data_cfg.shuffle_window > 1:
            packed = WindowShuffle(packed, data_cfg.shuffle_window, (data_cfg.shuffle_seed, s))
        streams[s] = _finish(packed.batch(per_stream, drop_remainder=True),
                             data_cfg.num_workers)
    return GlobalBatchIterator(streams, per_stream, rows)


def make_eval_iterator(data_cfg: DataConfig, tokenizer: Tokenizer, seq_len: int,
                       global_batch_size: int, process_index: int = 0,
                       process_count: int = 1, *, rows: Sequence[int] | None = None,
                       read_options: grain.ReadOptions | None = None,
                       ) -> grain.DatasetIterator:
    """One deterministic pass over the validation split, same batch format as training.

    Every host yields the same number of batches: floor(ceil(T / seq_len) /
    global_batch_size) for T validation tokens (EOS included), of `rows` [len(rows),
    seq_len] (default as in `make_train_iterator`); tokens of the final incomplete global
    batch are dropped. Runs in this process (reader threads only, no
    data.num_workers processes), so a fresh iterator per evaluation is cheap. Raises
    ValueError when data.validation_fraction == 0 or the split is empty.
    """
    rows = _check_shape(data_cfg, seq_len, global_batch_size, process_index, process_count,
                        rows)
    source = make_source(data_cfg, "validation")
    ds = grain.MapDataset.source(source).map(_Tokenize(tokenizer))
    packed = _Pack(ds.to_iter_dataset(read_options or READ_OPTIONS), seq_len, tokenizer.pad_id)
    batched = packed.batch(global_batch_size, drop_remainder=True)
    return iter(batched.map(_HostRows(rows)))


@dataclasses.dataclass(frozen=True)
class DataSummary:
    """What `check_enough_data` found (token counts include one EOS per document)."""
    train_documents: int
    train_tokens_at_least: int  # counting stops once one global batch is covered
    validation_documents: int  # 0 when evaluation was not checked
    validation_tokens: int
    validation_batches: int  # full global batches one eval pass yields (same on every host)


def _count_tokens(source, tokenizer: Tokenizer, stop_at: float = math.inf) -> int:
    total = 0
    for i in range(len(source)):
        total += len(tokenizer.encode(source[i])) + 1
        if total >= stop_at:
            break
    return total


def check_enough_data(data_cfg: DataConfig, tokenizer: Tokenizer, seq_len: int,
                      global_batch_size: int, process_count: int = 1, *,
                      evaluate: bool = True) -> DataSummary:
    """Start-up check, before any training work: raises ValueError naming the fix when the
    train split cannot fill one global batch per epoch, or (with `evaluate`) when there is
    no validation split or it yields no full batch.

    Reads train documents only until one batch of tokens is seen; tokenizes the whole
    validation split (what one eval pass costs). Use `validation_batches` to cap
    train.eval_batches.
    """
    _check_shape(data_cfg, seq_len, global_batch_size, 0, process_count)
    shape = f"{global_batch_size} x {seq_len} tokens"
    train = make_source(data_cfg, "train")
    need = global_batch_size * seq_len
    train_tokens = _count_tokens(train, tokenizer, stop_at=need)
    if train_tokens < need:
        raise ValueError(
            f"the train split yields 0 full batches of {shape} per epoch: its {len(train)} "
            f"documents hold {train_tokens} tokens ({describe(data_cfg)}, one EOS each); add "
            "documents or lower train.batch_size / train.seq_len.")
    if len(train) < data_cfg.streams:
        raise ValueError(
            f"the train split has {len(train)} documents, fewer than the data.streams="
            f"{data_cfg.streams} packing streams that share it ({describe(data_cfg)}); add "
            "documents or lower data.streams.")
    if not evaluate:
        return DataSummary(len(train), train_tokens, 0, 0, 0)
    valid = make_source(data_cfg, "validation")
    valid_tokens = _count_tokens(valid, tokenizer)
    batches = -(-valid_tokens // seq_len) // global_batch_size
    if batches == 0:
        raise ValueError(
            f"the validation split yields 0 full batches of {shape}: its {len(valid)} "
            f"documents hold {valid_tokens} tokens ({describe(data_cfg)}); raise "
            "data.validation_fraction, add documents, or lower train.batch_size / "
            "train.seq_len.")
    return DataSummary(len(train), train_tokens, len(valid), valid_tokens, batches)


def iterator_checkpoint_args(iterator: GlobalBatchIterator, restore: bool):
    """Orbax args for the data iterator inside `ocp.args.Composite(..., data=...)`.

    Save: `ocp.args.JsonSave` of every stream's state (`streams.global_state`, an
    all-gather across processes; the primary process writes it). Restore:
    `ocp.args.JsonRestore()`; pass the restored dict to `iterator.set_state`. One state for
    the whole job, so a checkpoint restores on any number of processes.
    """
    if restore:
        return ocp.args.JsonRestore()
    return ocp.args.JsonSave(global_state(iterator))
