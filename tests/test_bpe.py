"""BPE tokenizer trained per run; the bits/byte denominator; the compression baselines."""
from __future__ import annotations

import gzip
import json
import lzma

import numpy as np
import pytest

from moejax.config import DataConfig
from moejax.data import (ByteTokenizer, HFTokenizer, decoded_num_bytes, make_tokenizer,
                         save_tokenizer, token_bytes, tokenizer_for_run)
from moejax.data.bpe import TOKENIZER_FILE, bpe_tokenizer, bpe_vocab_size, training_sample
from moejax.eval.baselines import compression_baselines

VOCAB = 300  # 256 bytes + 2 specials + 42 merges: trains in milliseconds


def corpus(folder, n: int = 12) -> DataConfig:
    """n small Python-like documents as a text source, half of them held out."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        body = "".join(f"    value_{j} = compute(value_{j - 1}, {i})  # ünïcode\n"
                       for j in range(1, 8 + i))
        (folder / f"mod{i:02d}.py").write_text(f"def function_{i}(x):\n{body}    return x\n")
    return DataConfig(source="text", path=str(folder / "*.py"), tokenizer=f"bpe:{VOCAB}",
                      validation_fraction=0.3)


def test_bpe_spec_parsing():
    assert bpe_vocab_size("bpe:4096") == 4096
    assert bpe_vocab_size("byte") is None
    for bad in ("bpe:", "bpe:12", "bpe:4k"):
        with pytest.raises(ValueError, match="bpe:N"):
            bpe_vocab_size(bad)
    with pytest.raises(ValueError, match="tokenizer_for_run"):
        make_tokenizer("bpe:4096")


def test_bpe_is_deterministic_trained_on_train_split_only(tmp_path):
    cfg = corpus(tmp_path / "c")
    first, second = bpe_tokenizer(cfg, None), bpe_tokenizer(cfg, None)
    assert first.to_json() == second.to_json()
    assert first.vocab_size == VOCAB and (first.eos_id, first.pad_id) == (0, 1)
    from moejax.data import make_source
    held_out = [make_source(cfg, "validation")[i] for i in range(3)]
    sample = training_sample(cfg)
    assert sample and not set(sample) & set(held_out)
    assert sorted(sample) == sorted(make_source(cfg, "train")[i]
                                    for i in range(len(make_source(cfg, "train"))))
    text = "def f(x):\n    return x  # ü\n"
    ids = first.encode(text)
    assert len(ids) < len(text.encode()) and first.decode(ids) == text
    assert token_bytes(first, ids) == text.encode()


def test_bpe_is_cached_in_the_workdir_and_reused(tmp_path):
    cfg = corpus(tmp_path / "c")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ValueError, match="train first"):  # eval.py of an untrained workdir
        tokenizer_for_run(cfg, work, train=False)
    tok = tokenizer_for_run(cfg, work)
    assert not (work / TOKENIZER_FILE).exists(), "nothing written before save_tokenizer"
    save_tokenizer(tok, work)
    saved = (work / TOKENIZER_FILE).read_text()
    assert saved == tok.to_json()
    # More training text would train another BPE; a resumed run and eval.py keep the file.
    (tmp_path / "c" / "zzz.py").write_text("completely_different_identifier = 1\n" * 50)
    assert bpe_tokenizer(cfg, None).to_json() != saved
    for train in (True, False):
        again = tokenizer_for_run(cfg, work, train=train)
        assert again.to_json() == saved
        save_tokenizer(again, work)  # a loaded tokenizer is never rewritten
    assert (work / TOKENIZER_FILE).read_text() == saved
    bigger = DataConfig(**{**cfg.__dict__, "tokenizer": f"bpe:{VOCAB + 10}"})
    with pytest.raises(ValueError, match="keep the tokenizer"):
        tokenizer_for_run(bigger, work)


def test_bits_per_byte_denominator_for_bpe_by_hand(tmp_path):
    """Targets of a packed row: the end of one document, its EOS, the start of the next,
    with a multi-byte character cut between two byte-level ids."""
    tok = bpe_tokenizer(corpus(tmp_path / "c"), None)
    assert tok.id_bytes is not None
    first, second = "x = 1\n", "é = 2"
    ids = [*tok.encode(first), tok.eos_id, *tok.encode(second)]
    assert decoded_num_bytes(tok, ids) == len(first.encode()) + len("é = 2".encode())
    assert token_bytes(tok, ids) == (first + second).encode()
    # 'é' is two bytes; the byte alphabet holds each as its own id, and a row that ends
    # between them counts one byte (decoding would give U+FFFD, three bytes).
    e1, e2 = "é".encode()
    byte_ids = [tok.id_bytes.index(bytes([e1])), tok.id_bytes.index(bytes([e2]))]
    assert decoded_num_bytes(tok, byte_ids[:1]) == 1
    assert token_bytes(tok, byte_ids) == "é".encode()
    assert decoded_num_bytes(tok, [tok.eos_id, tok.pad_id]) == 0
    byte = ByteTokenizer()
    assert decoded_num_bytes(byte, [*byte.encode("é")[:1], byte.eos_id]) == 1


def test_non_byte_level_tokenizer_counts_decoded_bytes(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the cat sat"], trainers.WordLevelTrainer(
        special_tokens=["<unk>", "</s>"]))
    hf = HFTokenizer.from_json(tok.to_str(), "words")
    assert hf.id_bytes is None
    assert decoded_num_bytes(hf, hf.encode("the cat")) == len("the cat")


def test_compression_baselines_are_gzip_and_xz_of_exactly_the_bytes():
    data = ("def f(x):\n    return x + 1\n" * 40 + "ü").encode()
    out = compression_baselines(data)
    assert out["gzip_bits_per_byte"] == 8 * len(gzip.compress(data, 9, mtime=0)) / len(data)
    xz = lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
    assert out["xz_bits_per_byte"] == 8 * len(xz) / len(data)
    assert 0 < out["xz_bits_per_byte"] < 8 and 0 < out["gzip_bits_per_byte"] < 8
    with pytest.raises(ValueError, match="no evaluated bytes"):
        compression_baselines(b"")


@pytest.mark.slow  # ~25 s on 2 busy cores (compiles a model); the hand case above is fast
def test_heldout_evaluated_bytes_are_the_denominator(tmp_path):
    """HeldOut's bits/byte denominator is len(evaluated_bytes), and those bytes are the
    validation rows' target bytes in order, eos tokens and padding excluded."""
    import jax

    from conftest import small_config
    from moejax.config import resolve
    from moejax.sharding import make_mesh, use_mesh
    from moejax.train.heldout import HeldOut
    from moejax.train.loss import target_mask
    from moejax.train.state import init_state, make_setup

    data = corpus(tmp_path / "c", n=40)
    cfg = resolve(small_config(
        "data.source='text'", f"data.path='{data.path}'", f"data.tokenizer='bpe:{VOCAB}'",
        "data.validation_fraction=0.3", "model.vocab_size=384", "train.batch_size=8",
        "train.seq_len=32"))
    tok = bpe_tokenizer(cfg.data, None)
    mesh = make_mesh(cfg.mesh)
    with use_mesh(mesh):
        setup = make_setup(cfg, mesh)
        state = init_state(setup, jax.random.key(0))
        held = HeldOut(setup, cfg, tok, 1)
        metrics = held(state, with_details=True)
        batch = next(iter(held.batches()))
    mask = np.asarray(target_mask(batch["segment_ids"]))
    targets = [batch["tokens"][r, 1:][mask[r]] for r in range(8)]
    want = b"".join(token_bytes(tok, t) for t in targets)
    assert metrics["evaluated_bytes"] == want
    assert sum(int((t == tok.eos_id).sum()) for t in targets) > 0, "the hand case has eos"
    nll = metrics["validation/bits_per_byte"] * np.log(2) * len(want)
    count = sum(len(t) for t in targets)
    np.testing.assert_allclose(nll / count, metrics["validation/cross_entropy"], rtol=1e-5)


@pytest.mark.slow  # trains three times and evaluates (~3 min on 2 busy cores)
def test_train_resume_and_evaluate_share_the_workdir_bpe(tmp_path):
    """train.py trains and saves the BPE; the resumed run and eval.py load that file; the
    resumed run (window-shuffled rows) logs the losses of a straight run bitwise."""
    from conftest import small_config
    from moejax.eval import evaluate
    from moejax.train import train_and_evaluate

    data = corpus(tmp_path / "c", n=40)
    overrides = ["data.source='text'", f"data.path='{data.path}'",
                 f"data.tokenizer='bpe:{VOCAB}'", "data.validation_fraction=0.3",
                 "model.vocab_size=384", "train.batch_size=8", "train.seq_len=32",
                 "train.eval_batches=1", "train.log_every=1", "data.shuffle_window=4",
                 "optimizer.decay='constant'", "optimizer.warmup_steps=1"]  # 2 + 2 = 4 steps
    work = tmp_path / "run"
    train_and_evaluate(small_config(*overrides, "train.steps=2"), work)
    saved = (work / TOKENIZER_FILE).read_text()
    written = (work / TOKENIZER_FILE).stat().st_mtime_ns
    assert saved == bpe_tokenizer(data, None).to_json()
    assert train_and_evaluate(small_config(*overrides, "train.steps=4"), work)["step"] == 4
    assert (work / TOKENIZER_FILE).stat().st_mtime_ns == written, "read, not rewritten"
    straight = tmp_path / "straight"
    train_and_evaluate(small_config(*overrides, "train.steps=4"), straight)
    losses = [[r["loss"] for r in map(json.loads, (w / "metrics.jsonl").read_text().split(
        "\n")[:-1]) if "loss" in r and r["step"] > 2] for w in (work, straight)]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    result = evaluate(small_config(*overrides, "train.steps=4"), work, max_new_tokens=4)
    assert result["step"] == 4 and result["bits_per_byte"] > 0
    assert result["gzip_bits_per_byte"] > 0 and result["xz_bits_per_byte"] > 0
