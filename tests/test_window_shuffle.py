"""Window shuffle of packed rows: a permutation within each window, resumed bitwise."""
from __future__ import annotations

import json

import grain
import numpy as np
from test_data import assert_resumes_exactly, docs_filling, rows_of, take, write_docs

from moejax.config import DataConfig
from moejax.data import ByteTokenizer, make_train_iterator
from moejax.data.window_shuffle import WindowShuffle


def numbers(n: int) -> grain.IterDataset:
    return grain.MapDataset.range(n).to_iter_dataset()


def test_each_window_is_a_permutation_of_its_rows():
    out = list(WindowShuffle(numbers(23), 5, seed=(7,)))
    assert len(out) == 23
    for start in range(0, 23, 5):  # the last window is the short remainder
        window = out[start:start + 5]
        assert sorted(window) == list(range(start, min(start + 5, 23)))
    assert out != list(range(23)), "rows are moved"
    assert out == list(WindowShuffle(numbers(23), 5, seed=(7,))), "seeded"
    assert out != list(WindowShuffle(numbers(23), 5, seed=(8,)))
    assert list(WindowShuffle(numbers(9), 1, seed=(7,))) == list(range(9)), "1 = off"


def test_window_state_resumes_bitwise_at_every_position():
    straight = list(WindowShuffle(numbers(40), 6, seed=(1, 2)))
    for skip in range(20):
        it = iter(WindowShuffle(numbers(40), 6, seed=(1, 2)))
        take(it, skip)
        state = json.loads(json.dumps(it.get_state()))
        resumed = iter(WindowShuffle(numbers(40), 6, seed=(1, 2)))
        resumed.set_state(state)
        assert list(resumed) == straight[skip:], f"resume after {skip} rows"


def test_train_iterator_with_window_resumes_exactly(tmp_path):
    cfg = write_docs(tmp_path, docs_filling(8 * 2 * 9, 10, seed=1))
    shuffled = DataConfig(**{**cfg.__dict__, "shuffle_window": 4})
    tok = ByteTokenizer()
    plain_rows = rows_of(take(make_train_iterator(cfg, tok, 8, 2), 8))
    rows = rows_of(take(make_train_iterator(shuffled, tok, 8, 2), 8))
    for w in range(0, 16, 4):  # windows of 4 rows = 2 batches: the same rows, permuted
        key = lambda r: tuple(np.concatenate(r).tolist())  # noqa: E731
        assert sorted(map(key, rows[w:w + 4])) == sorted(map(key, plain_rows[w:w + 4]))
    assert [key(r) for r in rows] != [key(r) for r in plain_rows]
    # window start, inside a window, a window boundary
    assert_resumes_exactly(shuffled, (0, 1, 2, 5))
