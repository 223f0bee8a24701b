"""data.source="parquet": a row of a string column per document (moejax/data/parquet.py)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from test_data import as_tokens, assert_split, reconstruct, take

from moejax.config import DataConfig
from moejax.data import ByteTokenizer, make_source, make_train_iterator

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def write_parquet(folder, docs: list, row_group_size: int = 4, **columns) -> None:
    """Two files (the docs split 17 / rest), small row groups so reads cross them."""
    folder.mkdir(parents=True, exist_ok=True)
    for part, (lo, hi) in enumerate([(0, 17), (17, len(docs))]):
        table = pa.table({"body": docs[lo:hi], "id": list(range(lo, hi)),
                          **{k: v[lo:hi] for k, v in columns.items()}})
        pq.write_table(table, folder / f"part-{part}.parquet", row_group_size=row_group_size)


def test_rows_are_documents_split_stably_and_read_across_row_groups(tmp_path):
    docs = [f"row {i} " + "ü" * i for i in range(30)]
    write_parquet(tmp_path / "c", docs)
    cfg = DataConfig(source="parquet", path=str(tmp_path / "c" / "*.parquet"),
                     text_field="body", validation_fraction=0.3)
    assert_split(cfg, docs)  # disjoint, complete, in file order, the same when rebuilt
    source = make_source(cfg, "train")
    backwards = [source[i] for i in reversed(range(len(source)))]  # random access
    assert backwards[::-1] == [source[i] for i in range(len(source))]
    copy = pickle.loads(pickle.dumps(source))  # grain worker processes
    assert [copy[i] for i in range(len(copy))] == [source[i] for i in range(len(source))]


def test_a_batch_from_parquet_holds_its_documents(tmp_path):
    docs = [f"parquet document {i:02d}. " * 3 for i in range(24)]
    write_parquet(tmp_path, docs)
    cfg = DataConfig(source="parquet", path=str(tmp_path / "*.parquet"), text_field="body",
                     validation_fraction=0.0)
    got, _ = reconstruct(take(make_train_iterator(cfg, ByteTokenizer(), 32, 2), 12))
    expected = [as_tokens(d) for d in docs]
    assert len(got) >= 10 and all(doc in expected for doc in got)


def test_bad_columns_and_files_name_the_fix(tmp_path):
    write_parquet(tmp_path / "ok", ["a", "b"] * 10)
    base = dict(source="parquet", path=str(tmp_path / "ok" / "*.parquet"))
    with pytest.raises(ValueError, match=r"no column data.text_field='text' \(the file has "
                       r"\['body', 'id'\]\); set data.text_field"):
        make_source(DataConfig(**base), "train")
    with pytest.raises(ValueError, match="column data.text_field='id' holds int64, expected "
                       "a string column"):
        make_source(DataConfig(**base, text_field="id"), "train")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"x.parquet is not a Parquet file"):
        make_source(DataConfig(source="parquet", path=str(tmp_path / "bad" / "*.parquet")),
                    "train")
    with pytest.raises(ValueError, match="no files match data.path="):
        make_source(DataConfig(source="parquet", path=str(tmp_path / "none" / "*.parquet")),
                    "train")


def test_a_null_row_is_named_with_its_file_and_row(tmp_path):
    docs = [f"d{i}" for i in range(30)]
    docs[20] = None
    write_parquet(tmp_path, docs)
    source = make_source(DataConfig(source="parquet", path=str(tmp_path / "*.parquet"),
                                    text_field="body", validation_fraction=0.0), "train")
    with pytest.raises(ValueError, match=r"part-1.parquet:row 3: column "
                       r"data.text_field='body' is null"):
        [source[i] for i in range(len(source))]
    assert np.all([isinstance(source[i], str) for i in range(20)])
