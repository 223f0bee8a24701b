"""Parquet documents: one row of a string column per document (the `parquet` extra: pyarrow).

`data.source = "parquet"`, `data.path` a glob of .parquet files (local or a URL),
`data.text_field` the column holding the text. Indexing reads only each file's footer
(row counts per row group, the schema), so start-up is fast on any corpus size and a
wrong column name or a non-string column fails at once, naming the file and the columns.

Splits follow moejax/data/sources.py: row i of file f is in validation iff the stable
hash of ("relpath", i) maps below `data.validation_fraction`.

Reads are random access (grain shuffles documents): a document reads its row group's
column once, and the last `CACHED_ROW_GROUPS` row groups stay decoded, so a shuffle
window of nearby rows costs one read per row group. Files written with row groups of a
few thousand rows (pyarrow's `row_group_size`) keep a random read cheap; grain's own
`ParquetIterDataset` reads files in order, which the splits and the global shuffle of this
pipeline cannot use.
"""
from __future__ import annotations

import collections
import threading
from typing import Any

import numpy as np

from moejax.data.sources import _check_split, _keep, _open, _relative, glob_files, item_fractions

CACHED_ROW_GROUPS = 8
STRING_TYPES = ("string", "large_string", "string_view")


def _pyarrow_parquet() -> Any:
    try:  # optional: only data.source="parquet" needs it
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError("data.source='parquet' needs pyarrow: pip install "
                         "'moejax[parquet]' (or pip install pyarrow).") from e
    return pq


class ParquetSource:
    """The `text_field` column of the split's rows of every file matching `pattern`."""

    def __init__(self, pattern: str, text_field: str, split: str, validation_fraction: float):
        _check_split(split)
        pq = _pyarrow_parquet()
        root, self.files = glob_files(pattern, "parquet")
        self.text_field = text_field
        self.group_starts: list[np.ndarray] = []  # per file: first row of each row group
        keys, offsets, offset = [], [], 0
        for path in self.files:
            metadata = self._footer(pq, path)
            sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
            self.group_starts.append(np.cumsum([0] + sizes)[:-1])
            keep = _keep(item_fractions(_relative(path, root), metadata.num_rows), split,
                         validation_fraction)
            keys.append(np.flatnonzero(keep) + offset)
            offsets.append(offset)
            offset += metadata.num_rows
        self.file_offsets = np.asarray(offsets, np.int64)
        self.keys = np.concatenate(keys).astype(np.int64)
        self.name = f"parquet[{split}]"
        self._cache: collections.OrderedDict[tuple[int, int], list] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _footer(self, pq: Any, path: str) -> Any:
        """The file's metadata, after checking that `text_field` is a string column."""
        try:
            with _open(path) as f:  # the footer only: schema and row-group sizes
                metadata = pq.ParquetFile(f).metadata
            schema = metadata.schema.to_arrow_schema()
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError on a bad file
            raise ValueError(f"data.path: {path} is not a Parquet file ({e}).") from e
        if self.text_field not in schema.names:
            raise ValueError(f"{path}: no column data.text_field={self.text_field!r} (the "
                             f"file has {schema.names}); set data.text_field.")
        kind = str(schema.field(self.text_field).type)
        if kind not in STRING_TYPES:
            raise ValueError(f"{path}: column data.text_field={self.text_field!r} holds "
                             f"{kind}, expected a string column.")
        return metadata

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> str:
        key = int(self.keys[index])
        fid = int(np.searchsorted(self.file_offsets, key, side="right")) - 1
        row = key - int(self.file_offsets[fid])
        group = int(np.searchsorted(self.group_starts[fid], row, side="right")) - 1
        value = self._row_group(fid, group)[row - int(self.group_starts[fid][group])]
        if value is None:
            raise ValueError(f"{self.files[fid]}:row {row}: column data.text_field="
                             f"{self.text_field!r} is null, expected a string.")
        return value

    def _row_group(self, fid: int, group: int) -> list:
        """The column of one row group as Python strings (cached; thread-safe)."""
        with self._lock:
            cached = self._cache.get((fid, group))
            if cached is not None:
                self._cache.move_to_end((fid, group))
                return cached
        pq = _pyarrow_parquet()
        with _open(self.files[fid]) as f:
            table = pq.ParquetFile(f).read_row_group(group, columns=[self.text_field])
        values = table.column(0).to_pylist()
        with self._lock:
            self._cache[(fid, group)] = values
            while len(self._cache) > CACHED_ROW_GROUPS:
                self._cache.popitem(last=False)
        return values

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = collections.OrderedDict()  # worker processes read their own
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{self.name}({len(self)} documents in {len(self.files)} files)"

