"""Fault injection: bad configs, malformed data, unwritable workdirs, full disks, kill -9.

Default tests run in this process (config fuzz, data files, read-only workdir); the ones
that launch train.py and kill it, or fill its disk, are `slow`, each bounded by subprocess
timeouts. Every run shares the shapes of tests/test_train.py's TRAIN (one compiled program,
in the persistent compile cache).
"""
from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moejax.config import apply_overrides, load_config_file, resolve

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- config fuzz

CONFIG_FILES = ("tiny", "deepseek_v3", "deepseek_v4")


def _leaves(node, prefix=""):
    for key, value in node.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


FIELDS = sorted({(name, key, type(value)) for name in CONFIG_FILES for key, value in
                 _leaves(load_config_file(str(ROOT / "configs" / f"{name}.py")))},
                key=lambda f: (f[0], f[1]))
VALUES = {
    "none": st.none(),
    "bool": st.booleans(),
    "int": st.integers(-10**6, 10**6),
    "float": st.floats(allow_nan=False, allow_infinity=False).filter(
        lambda x: not x.is_integer()),
    "str": st.text(max_size=8),
    "list": st.lists(st.integers(-3, 3), max_size=3),
    "dict": st.dictionaries(st.sampled_from("abc"), st.integers(0, 3), max_size=2),
}
# The value kinds a field of each type accepts; every other kind must be refused.
ACCEPTED = {bool: {"bool"}, int: {"int"}, float: {"int", "float"}, str: {"str"},
            tuple: {"list"}}


def _other_kind(field_type):
    return st.sampled_from(sorted(set(VALUES) - ACCEPTED[field_type]))


@st.composite
def _wrong_type_override(draw):
    name, key, field_type = draw(st.sampled_from(FIELDS))
    kind = draw(_other_kind(field_type))
    return name, key, kind, draw(VALUES[kind])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_wrong_type_override())
def test_an_override_of_another_type_is_a_value_error_naming_the_field(case):
    """`load_config`'s parser + `resolve`: a value of another type for any field of any
    shipped config is refused with a ValueError naming the dotted field, never another
    exception from deeper down."""
    name, key, kind, value = case
    cfg = load_config_file(str(ROOT / "configs" / f"{name}.py"))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        apply_overrides(cfg, [f"{key}={value!r}"])
        resolve(cfg)


@pytest.mark.parametrize("key", ["optimizer.learning_rate", "model.rope.theta",
                                 "model.moe.capacity_factor"])
@pytest.mark.parametrize("text", ["1e999", "-1e999"])
def test_a_float_field_refuses_inf(key, text):
    """'1e999' parses to inf, which no float field means (NaN arrives as the string 'nan')."""
    cfg = load_config_file(str(ROOT / "configs" / "tiny.py"))
    apply_overrides(cfg, [f"{key}={text}"])
    with pytest.raises(ValueError, match=re.escape(key) + ".*finite"):
        resolve(cfg)


# -------------------------------------------------------------------- malformed data files

def _data_config(directory, source, *overrides):
    from conftest import small_config
    pattern = f"{directory}/*.{'jsonl' if source == 'jsonl' else 'txt'}"
    return resolve(small_config("model.vocab_size=384", "train.batch_size=8",
                                "train.seq_len=32", f"data.source='{source}'",
                                f"data.path='{pattern}'", *overrides))


def _first_batches(cfg, count):
    from moejax import data as moedata
    from moejax.train.loop import check_inputs
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
    from moejax.data.sources import text_source
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
