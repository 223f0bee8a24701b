"""Malformed data files: invalid UTF-8, 0-byte files, a document larger than the whole
batch, bad JSONL records. Each is a ValueError naming the file, line and field, or handled
as README "When things go wrong" says. In this process, no training.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import small_config

from moejax import data as moedata
from moejax.config import resolve
from moejax.data.sources import text_source
from moejax.train.loop import check_inputs


def _data_config(directory, source, *overrides):
    pattern = f"{directory}/*.{'jsonl' if source == 'jsonl' else 'txt'}"
    return resolve(small_config("model.vocab_size=384", "train.batch_size=8",
                                "train.seq_len=32", f"data.source='{source}'",
                                f"data.path='{pattern}'", *overrides))


def _first_batches(cfg, count):
    tokenizer, _ = check_inputs(cfg)
    iterator = moedata.make_train_iterator(cfg.data, tokenizer, cfg.train.seq_len,
                                           cfg.train.batch_size)
    try:
        return [next(iterator) for _ in range(count)]
    finally:
        iterator.close()


def _jsonl_lines(count):
    return [json.dumps({"text": f"document {i} " * 8}).encode() for i in range(count)]


GOOD_TEXT = b"def f(x):\n    return x + 1\n" * 12


def test_invalid_utf8_in_a_text_file_is_read_with_replacement_characters(tmp_path):
    """Text sources decode with errors='replace' (documented): a stray byte becomes U+FFFD
    (UTF-8 EF BF BD in byte tokens), the rest of the file is kept."""
    for i in range(2):
        (tmp_path / f"doc{i}.txt").write_bytes(GOOD_TEXT)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait " * 40)  # not UTF-8
    cfg = _data_config(tmp_path, "text", "data.validation_fraction=0.0")
    source = text_source(cfg.data.path, "train", 0.0)
    document = source[source.rel_paths.index("latin1.txt")]
    assert document.startswith("caf\ufffd au lait ")
    tokens = np.concatenate([b["tokens"].ravel() for b in _first_batches(cfg, 8)])  # > 1 epoch
    assert b"caf\xef\xbf\xbd au" in tokens[tokens < 256].astype(np.uint8).tobytes()


@pytest.mark.parametrize("source", ["text", "jsonl"])
def test_a_zero_byte_file_is_an_empty_document_or_none(tmp_path, source):
    """text: a 0-byte file is one empty document (an EOS token only); jsonl: it holds no
    lines. Only 0-byte files: a ValueError naming data.path (one EOS token cannot fill a
    batch; no lines make an empty split)."""
    (tmp_path / f"empty.{'jsonl' if source == 'jsonl' else 'txt'}").write_bytes(b"")
    cfg = _data_config(tmp_path, source, "data.validation_fraction=0.0")
    error = {"text": r"train split yields 0 full batches .* its 1 documents hold 1 tokens "
                     r"\(data.source='text' data.path=",
             "jsonl": r"train split of data.source='jsonl' data.path=.* is empty"}[source]
    with pytest.raises(ValueError, match=error):
        _first_batches(cfg, 1)
    if source == "text":
        for i in range(20):
            (tmp_path / f"doc{i}.txt").write_bytes(GOOD_TEXT)
    else:
        (tmp_path / "good.jsonl").write_bytes(b"\n".join(_jsonl_lines(40)))
    batches = _first_batches(cfg, 6)
    assert all(b["tokens"].shape == (8, 32) for b in batches)


@pytest.mark.parametrize("source", ["text", "jsonl"])
def test_one_document_larger_than_the_whole_batch_is_split_across_rows_and_batches(
        tmp_path, source):
    """One 5-batch document (and nothing else): packing cuts it into full rows in order,
    every row a segment of it (no padding), and the next epoch starts it again."""
    rng = np.random.default_rng(0)
    text = rng.integers(ord("a"), ord("z") + 1, 5 * 8 * 32).astype(np.uint8).tobytes().decode()
    if source == "text":
        (tmp_path / "big.txt").write_text(text)
    else:
        (tmp_path / "big.jsonl").write_text(json.dumps({"text": text}) + "\n")
    cfg = _data_config(tmp_path, source, "data.validation_fraction=0.0")
    batches = _first_batches(cfg, 6)
    tokens = np.concatenate([b["tokens"].reshape(-1) for b in batches])
    segments = np.concatenate([b["segment_ids"].reshape(-1) for b in batches])
    assert np.all(segments > 0)  # no padding anywhere
    expected = np.frombuffer(text.encode(), np.uint8).astype(np.int32)
    np.testing.assert_array_equal(tokens[:len(expected)], expected)
    assert tokens[len(expected)] == 258  # its EOS, then the document again
    np.testing.assert_array_equal(tokens[len(expected) + 1:], expected[:len(tokens)
                                                                       - len(expected) - 1])


@pytest.mark.parametrize("record, error", [
    (b'{"text": 5}', r"field data.text_field='text' holds a int, expected a string"),
    (b'{"text": ["a", "b"]}', r"field data.text_field='text' holds a list"),
    (b'{"text": null}', r"field data.text_field='text' holds a NoneType"),
    (b'{"body": "no text field"}', r"no field data.text_field='text'"),
    (b'{"text": "caf\xe9"}', r"not valid JSON \('utf-8' codec can't decode"),
    (b'{"text": "cut short', r"not valid JSON"),
])
@pytest.mark.parametrize("line", [1, 60])
def test_a_bad_jsonl_record_is_a_value_error_naming_the_file_line_and_field(
        tmp_path, record, error, line):
    """Line 1 is checked at start-up; a later one when it is read (mid-run: train.py then
    exits 1 with this line, and the checkpoints written so far stay)."""
    lines = _jsonl_lines(120)
    lines.insert(line - 1, record)
    (tmp_path / "corpus.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    cfg = _data_config(tmp_path, "jsonl", "data.validation_fraction=0.0")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/corpus.jsonl:line {line}: ")
                       + ".*" + error):
        _first_batches(cfg, 12)
