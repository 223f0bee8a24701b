"""Data pipeline: tokenizers, sources, splits, packing, shuffling, sharding, resumption."""
from __future__ import annotations

import json
from typing import Iterable
import math
import random

import numpy as np
import pytest

from moejax.config import DataConfig
from moejax.data.streams import merge_states
from moejax.data import (ByteTokenizer, HFTokenizer, check_enough_data, decoded_num_bytes,
                         iterator_checkpoint_args, make_eval_iterator, make_source,
                         make_tokenizer, make_train_iterator, stdlib_files,
                         unigram_bits_per_byte)
from moejax.data.sources import EXCLUDED_DIRS

EOS = ByteTokenizer.eos_id
PAD = ByteTokenizer.pad_id


def write_docs(folder, docs: list[str]) -> DataConfig:
    """One text file per document; returns a text-source config with no validation split."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(doc)
    return DataConfig(source="text", path=str(folder / "*.txt"), validation_fraction=0.0)


def docs_filling(n_tokens: int, n_docs: int, seed: int = 0) -> list[str]:
    """`n_docs` distinct ASCII documents of random lengths (some longer than the rows used
    below) whose byte-token count with one EOS each is exactly `n_tokens`."""
    rng = random.Random(seed)
    longest = 2 * (n_tokens // n_docs) - 6
    while True:
        docs = [f"{i}|" + "".join(rng.choice("abcdefgh") for _ in range(rng.randint(0, longest)))
                for i in range(n_docs - 1)]
        rest = n_tokens - sum(len(d) + 1 for d in docs) - 1
        if rest >= 3:
            return docs + [f"{n_docs - 1}|" + "z" * (rest - 3)]


def rows_of(batches) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [(b["tokens"][r], b["segment_ids"][r], b["positions"][r])
            for b in batches for r in range(b["tokens"].shape[0])]


def reconstruct(batches) -> tuple[list[list[int]], list[int]]:
    """Documents (token lists ending in EOS) rebuilt from consecutive packed rows, checking
    the row invariants on the way; returns (documents, unfinished tail)."""
    docs, current = [], []
    for tokens, seg, pos in rows_of(batches):
        n = int(np.count_nonzero(seg))
        assert (seg[n:] == 0).all() and (tokens[n:] == PAD).all(), "padding only at the end"
        ids = np.unique(seg[:n])
        assert list(ids) == list(range(1, len(ids) + 1)), "segments are numbered 1, 2, ..."
        for s in ids:
            where = np.flatnonzero(seg == s)
            assert (np.diff(where) == 1).all(), "a segment is contiguous"
            assert (pos[where] == np.arange(len(where))).all(), "positions restart at 0"
            piece = tokens[where].tolist()
            assert EOS not in piece[:-1], "no token crosses a document boundary"
            if piece[-1] != EOS:
                assert where[-1] == len(seg) - 1, "only the row's last piece continues"
            current.extend(piece)
            if piece[-1] == EOS:
                docs.append(current)
                current = []
    return docs, current


def as_tokens(doc: str) -> list[int]:
    return list(doc.encode()) + [EOS]


def take(it, n):
    return [next(it) for _ in range(n)]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b))


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_bytes():
    tok = make_tokenizer("byte")
    text = "héllo wörld → 🚀\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    assert tok.decode(list(ids) + [tok.eos_id, tok.pad_id, tok.bos_id]) == text
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    assert decoded_num_bytes(tok, list(ids[:2]) + [tok.eos_id]) == 2  # 'h' + half of 'é'
    assert tok.decode(ids[:2]) == "h\ufffd"


def build_hf_tokenizer(path, eos="</s>"):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<unk>", "<pad>", "<s>"] + ([eos] if eos else [])
    tok.train_from_iterator(["the cat sat", "on the mat", "a cat"],
                            trainers.WordLevelTrainer(special_tokens=specials))
    tok.save(str(path))


def test_hf_tokenizer_json(tmp_path):
    build_hf_tokenizer(tmp_path / "tokenizer.json")
    for spec in (str(tmp_path / "tokenizer.json"), str(tmp_path)):
        tok = make_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        ids = tok.encode("the cat sat on the mat")
        assert len(ids) == 6 and tok.vocab_size == 10
        assert (tok.pad_id, tok.bos_id, tok.eos_id) == (1, 2, 3)
        assert tok.decode(list(ids) + [tok.eos_id]) == "the cat sat on the mat"
        assert decoded_num_bytes(tok, ids) == len("the cat sat on the mat")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        make_tokenizer(str(tmp_path / "missing.json"))
    build_hf_tokenizer(tmp_path / "noeos.json", eos=None)
    with pytest.raises(ValueError, match="no end-of-sequence token"):
        make_tokenizer(str(tmp_path / "noeos.json"))


def test_unigram_bits_per_byte():
    assert unigram_bits_per_byte([], ["anything"]) == pytest.approx(8.0)  # uniform
    train, valid = ["aab"], ["ab"]
    p_a, p_b = 3 / 259, 2 / 259
    assert unigram_bits_per_byte(train, valid) == pytest.approx(
        -(math.log2(p_a) + math.log2(p_b)) / 2)
    with pytest.raises(ValueError, match="no bytes"):
        unigram_bits_per_byte(train, [""])


# ---------------------------------------------------------------- sources and splits


def all_docs(src) -> list[str]:
    return [src[i] for i in range(len(src))]


def assert_split(cfg: DataConfig, expected: list[str]):
    """train and validation are disjoint, cover `expected`, and are rebuilt identically."""
    train, valid = all_docs(make_source(cfg, "train")), all_docs(make_source(cfg, "validation"))
    assert train and valid
    assert sorted(train + valid) == sorted(expected)
    assert all_docs(make_source(cfg, "validation")) == valid


def test_builtin_corpus_files_and_split():
    root, files = stdlib_files()
    assert 300 < len(files) and files == sorted(files) and "os.py" in files
    assert not any(set(f.split("/")[:-1]) & EXCLUDED_DIRS for f in files)
    cfg = DataConfig(validation_fraction=0.05)
    train, valid = make_source(cfg, "train"), make_source(cfg, "validation")
    assert set(train.rel_paths).isdisjoint(valid.rel_paths)
    assert sorted(train.rel_paths + valid.rel_paths) == files
    assert 0.01 < len(valid) / len(files) < 0.12
    assert make_source(cfg, "validation").rel_paths == valid.rel_paths
    assert "import" in valid[0]


def test_text_source_split(tmp_path):
    docs = [f"document {i}" for i in range(40)]
    cfg = write_docs(tmp_path / "c", docs)
    assert_split(DataConfig(source="text", path=cfg.path, validation_fraction=0.3), docs)
    # The split depends on the names relative to the glob, not on where the folder is.
    moved = write_docs(tmp_path / "elsewhere" / "c", docs)
    a = make_source(DataConfig(source="text", path=cfg.path, validation_fraction=0.3), "train")
    b = make_source(DataConfig(source="text", path=moved.path, validation_fraction=0.3),
                    "train")
    assert a.rel_paths == b.rel_paths


def test_jsonl_source(tmp_path):
    docs = [f"line {i} " + "é" * i for i in range(30)]
    lines = [json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:20]) + "\n\n  \n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[20:]))  # no final newline
    cfg = DataConfig(source="jsonl", path=str(tmp_path / "*.jsonl"), text_field="body",
                     validation_fraction=0.3)
    assert_split(cfg, docs)
    with pytest.raises(ValueError, match="no field data.text_field='text'"):
        make_source(DataConfig(source="jsonl", path=cfg.path), "train")
    (tmp_path / "c.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        make_source(cfg, "train")


@pytest.mark.parametrize("as_json", [False, True])
def test_arrayrecord_source(tmp_path, as_json):
    from array_record.python.array_record_module import ArrayRecordWriter
    docs = [f"record {i} ü" for i in range(30)]
    for part, chunk in enumerate([docs[:17], docs[17:]]):
        writer = ArrayRecordWriter(str(tmp_path / f"d-{part}.arrayrecord"), "group_size:1")
        for d in chunk:
            writer.write((json.dumps({"text": d, "n": 1}) if as_json else d).encode())
        writer.close()
    cfg = DataConfig(source="arrayrecord", path=str(tmp_path / "*.arrayrecord"),
                     validation_fraction=0.3)
    assert make_source(cfg, "train").is_json == as_json
    assert_split(cfg, docs)


# ---------------------------------------------------------------- packing


def test_packing_one_epoch_exactly_once(tmp_path):
    seq_len, batch, n_batches = 16, 2, 6
    docs = docs_filling(seq_len * batch * n_batches, 12)
    cfg = write_docs(tmp_path, docs)
    it = make_train_iterator(cfg, ByteTokenizer(), seq_len, batch)
    epoch1, epoch2 = take(it, n_batches), take(it, n_batches)
    for b in epoch1:
        assert set(b) == {"tokens", "segment_ids", "positions"}
        assert all(v.shape == (batch, seq_len) and v.dtype == np.int32 for v in b.values())
    expected = sorted(as_tokens(d) for d in docs)
    for epoch in (epoch1, epoch2):
        got, tail = reconstruct(epoch)
        assert tail == [] and sorted(got) == expected  # every token exactly once
    assert reconstruct(epoch1)[0] != reconstruct(epoch2)[0]  # reshuffled each epoch


def test_long_document_is_split_into_segments(tmp_path):
    cfg = write_docs(tmp_path, ["a" * 40])
    cfg = DataConfig(**{**cfg.__dict__, "shuffle_seed": 3})
    rows = rows_of(take(make_train_iterator(cfg, ByteTokenizer(), 16, 1), 3))
    tokens = np.concatenate([r[0] for r in rows])
    assert tokens[:41].tolist() == as_tokens("a" * 40)
    assert [r[2].tolist() for r in rows[:2]] == [list(range(16))] * 2
    assert rows[2][1].tolist() == [1] * 9 + [2] * 7  # 9-token tail, then the next epoch
    assert rows[2][2].tolist() == list(range(9)) + list(range(7))


def test_shuffle_depends_on_seed_only(tmp_path):
    cfg = write_docs(tmp_path, docs_filling(16 * 4 * 3, 20))
    tok = ByteTokenizer()
    first = lambda seed: take(make_train_iterator(
        DataConfig(**{**cfg.__dict__, "shuffle_seed": seed}), tok, 16, 4), 3)
    assert same_batches(first(0), first(0))
    assert not same_batches(first(0), first(1))


def shards(cfg, seq_len, batch, hosts, steps, state=None):
    """Each of `hosts` processes' batches (contiguous rows), optionally restored."""
    its = [make_train_iterator(cfg, ByteTokenizer(), seq_len, batch, p, hosts)
           for p in range(hosts)]
    for it in its:
        if state is not None:
            it.set_state(json.loads(json.dumps(state)))
    return its, [take(it, steps) for it in its]


def glue(per_host):
    """Concatenates the hosts' rows of each step: the global batches."""
    return [{k: np.concatenate([h[i][k] for h in per_host]) for k in per_host[0][i]}
            for i in range(len(per_host[0]))]


@pytest.mark.parametrize("streams", [1, 2, 4])
def test_global_batch_does_not_depend_on_the_process_count(tmp_path, streams):
    seq_len, batch = 16, 8
    cfg = write_docs(tmp_path, docs_filling(seq_len * batch * 3, 30, seed=4))
    cfg = DataConfig(**{**cfg.__dict__, "streams": streams})
    _, (whole,) = shards(cfg, seq_len, batch, 1, 4)
    for hosts in (2, 4):
        its, per_host = shards(cfg, seq_len, batch, hosts, 4)
        assert per_host[0][0]["tokens"].shape == (batch // hosts, seq_len)
        assert same_batches(glue(per_host), whole), f"{hosts} processes, {streams} streams"
        # a process reads only the streams that hold its rows
        assert len(its[0].streams) == max(1, streams // hosts)


def test_any_rows_of_the_global_batch(tmp_path):
    seq_len, batch = 16, 8
    cfg = DataConfig(**{**write_docs(tmp_path, docs_filling(16 * 8 * 2, 20)).__dict__,
                        "streams": 2})
    whole = take(make_train_iterator(cfg, ByteTokenizer(), seq_len, batch), 3)
    rows = [6, 1, 3]  # e.g. a mesh whose devices interleave processes; sorted on output
    got = take(make_train_iterator(cfg, ByteTokenizer(), seq_len, batch, rows=rows), 3)
    for w, g in zip(whole, got):
        for k in w:
            assert np.array_equal(g[k], w[k][[1, 3, 6]])
    with pytest.raises(ValueError, match="subset of range"):
        make_train_iterator(cfg, ByteTokenizer(), seq_len, batch, rows=[8])


def test_resume_on_a_different_process_count(tmp_path):
    seq_len, batch = 16, 8
    cfg = DataConfig(**{**write_docs(tmp_path, docs_filling(16 * 8 * 3, 30, seed=5)).__dict__,
                        "streams": 4})
    _, (whole,) = shards(cfg, seq_len, batch, 1, 7)
    its, _ = shards(cfg, seq_len, batch, 2, 3)  # 2 processes run 3 steps ...
    state = merge_states([it.get_state() for it in its])  # ... what a checkpoint holds
    for hosts in (1, 4):  # ... and the run resumes on 1 or 4 processes
        _, per_host = shards(cfg, seq_len, batch, hosts, 4, state)
        assert same_batches(glue(per_host), whole[3:]), f"resumed on {hosts}"
    with pytest.raises(ValueError, match="keep train.batch_size and data.streams"):
        make_train_iterator(cfg, ByteTokenizer(), seq_len, 4).set_state(state)


def test_eval_iterator_is_one_deterministic_pass_sharded_by_rows(tmp_path):
    docs = [f"doc {i} " + "y" * (i % 23) for i in range(60)]
    cfg = DataConfig(**{**write_docs(tmp_path, docs).__dict__, "validation_fraction": 0.5})
    tok, seq_len = ByteTokenizer(), 16
    valid = all_docs(make_source(cfg, "validation"))
    whole = list(make_eval_iterator(cfg, tok, seq_len, 4))
    assert same_batches(whole, list(make_eval_iterator(cfg, tok, seq_len, 4)))
    n_tokens = sum(len(as_tokens(d)) for d in valid)
    assert len(whole) == -(-n_tokens // seq_len) // 4
    assert check_enough_data(cfg, tok, seq_len, 4, 2).validation_batches == len(whole)
    got, _ = reconstruct(whole)
    assert got == [as_tokens(d) for d in valid[:len(got)]]  # index order, nothing skipped
    hosts = [list(make_eval_iterator(cfg, tok, seq_len, 4, p, 2)) for p in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == len(whole)
    for w, h0, h1 in zip(whole, *hosts):
        for k in w:
            assert np.array_equal(w[k], np.concatenate([h0[k], h1[k]]))


# ---------------------------------------------------------------- checkpointing


def assert_resumes_exactly(cfg: DataConfig, skips: Iterable[int]) -> None:
    """After each number of batches in `skips`, a fresh iterator given the saved state
    (through a checkpoint's JSON round trip) yields the next 5 batches exactly."""
    tok = ByteTokenizer()
    for skip in skips:
        it = make_train_iterator(cfg, tok, 8, 2)
        take(it, skip)
        state = json.loads(json.dumps(it.get_state()))
        want = take(it, 5)
        resumed = make_train_iterator(cfg, tok, 8, 2)
        resumed.set_state(state)
        assert same_batches(take(resumed, 5), want), f"resume after {skip} batches"


def test_state_round_trip_resumes_exactly(tmp_path):
    cfg = write_docs(tmp_path, docs_filling(8 * 2 * 9, 10, seed=1))
    assert_resumes_exactly(cfg, range(12))  # states with and without a split remainder


def test_orbax_checkpoint_of_iterator(tmp_path):
    import orbax.checkpoint as ocp
    cfg = write_docs(tmp_path / "c", docs_filling(8 * 2 * 9, 10, seed=2))
    tok = ByteTokenizer()
    it = make_train_iterator(cfg, tok, 8, 2)
    take(it, 4)
    state = {"w": np.arange(3.0)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=iterator_checkpoint_args(it, restore=False)))
        mngr.wait_until_finished()
    want = take(it, 4)
    fresh = make_train_iterator(cfg, tok, 8, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        out = mngr.restore(4, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state),
            data=iterator_checkpoint_args(fresh, restore=True)))
    fresh.set_state(out.data)
    assert np.array_equal(out.state["w"], state["w"])
    assert same_batches(take(fresh, 4), want)


# ---------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors(tmp_path):
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match=r"no files match data.path='.*nothing\*'"):
        make_source(DataConfig(source="text", path=str(tmp_path / "nothing*")), "train")
    with pytest.raises(ValueError, match="data.source='csv' is invalid"):
        make_source(DataConfig(source="csv", path="x"), "train")
    cfg = write_docs(tmp_path / "c", ["one", "two", "three"])
    with pytest.raises(ValueError, match="data.validation_fraction=0.0 holds out no doc"):
        make_eval_iterator(cfg, tok, 8, 2)
    tiny = DataConfig(**{**cfg.__dict__, "validation_fraction": 1e-12})
    with pytest.raises(ValueError, match="the validation split of .* is empty .*; raise data.v"):
        make_source(tiny, "validation")
    every = DataConfig(**{**cfg.__dict__, "validation_fraction": 0.999999})
    with pytest.raises(ValueError, match="the train split of .* is empty .*; lower data.valid"):
        make_train_iterator(every, tok, 8, 2)
    with pytest.raises(ValueError, match=r"the train split yields 0 full batches of 4 x 8 "):
        check_enough_data(cfg, tok, 8, 4, evaluate=False)
    assert check_enough_data(cfg, tok, 4, 2, evaluate=False).train_documents == 3
    big = write_docs(tmp_path / "big", ["w" * 100 for _ in range(40)])
    big = DataConfig(**{**big.__dict__, "validation_fraction": 0.1})
    assert 0 < len(make_source(big, "validation")) < 10  # < 1010 tokens: under 16 x 64
    with pytest.raises(ValueError, match="the validation split yields 0 full batches of 16"):
        check_enough_data(big, tok, 64, 16)
    with pytest.raises(ValueError, match="train.batch_size=3 is invalid: must be divisible"):
        make_train_iterator(cfg, tok, 8, 3, 0, 2)
    with pytest.raises(ValueError, match="data.shuffle_seed=-1"):
        make_train_iterator(DataConfig(**{**cfg.__dict__, "shuffle_seed": -1}), tok, 8, 2)
    (tmp_path / "bad.arrayrecord").write_bytes(b"not an array record")
    with pytest.raises(ValueError, match="not an ArrayRecord file"):
        make_source(DataConfig(source="arrayrecord", path=str(tmp_path / "*.arrayrecord")),
                    "train")


@pytest.mark.slow  # ~10 s: spawns worker processes that import jax
def test_worker_processes_resume_exactly(tmp_path):
    """data.num_workers > 0 (grain mp_prefetch): resumable; restore needs the same count."""
    cfg = write_docs(tmp_path, docs_filling(8 * 2 * 9, 10, seed=3))
    cfg = DataConfig(**{**cfg.__dict__, "num_workers": 2})
    tok = ByteTokenizer()
    it = make_train_iterator(cfg, tok, 8, 2)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    want = take(it, 4)
    it.close()
    resumed = make_train_iterator(cfg, tok, 8, 2)
    resumed.set_state(state)
    got = take(resumed, 4)
    resumed.close()
    assert same_batches(got, want)


def test_checkpoint_of_the_grain_format_still_resumes(tmp_path):
    """Checkpoints written before data streams hold grain's per-process JSON; one process
    with one stream read exactly today's stream 0, so they resume where they stopped."""
    import orbax.checkpoint as ocp
    from grain.checkpoint import CheckpointSave
    from moejax.train import checkpoint
    cfg = write_docs(tmp_path / "c", docs_filling(8 * 2 * 9, 10, seed=6))
    tok = ByteTokenizer()
    it = make_train_iterator(cfg, tok, 8, 2)
    take(it, 3)
    state = {"w": np.arange(3.0)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:  # the format before streams
        mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=CheckpointSave(it.streams[0])))
        mngr.wait_until_finished()
    want = take(it, 4)
    fresh = make_train_iterator(cfg, tok, 8, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = checkpoint.restore(mngr, 3, state, fresh)
    assert np.array_equal(restored["w"], state["w"])
    assert same_batches(take(fresh, 4), want)
    two_streams = make_train_iterator(DataConfig(**{**cfg.__dict__, "streams": 2}), tok, 8, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        with pytest.raises(ValueError, match="one process with data.streams=1"):
            checkpoint.restore(mngr, 3, state, two_streams)
