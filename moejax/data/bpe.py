"""Byte-level BPE trained on the training split: `data.tokenizer = "bpe:<vocab size>"`.

The tokenizer is a GPT-2-style byte-level BPE (HuggingFace `tokenizers`: ByteLevel
pre-tokenizer and decoder, so every UTF-8 byte string is encodable and each id stands for
a fixed byte string). It is trained on a bounded, deterministic sample of the *training*
split only (documents in the order of a seeded permutation, `data.shuffle_seed`, until
`SAMPLE_BYTES` bytes), so the validation text never shapes the vocabulary. Ids 0 and 1 are
the special tokens `<|endoftext|>` (eos, also bos) and `<pad>`; the vocabulary holds
exactly the requested size (fewer only when the sample has too few distinct merges).

A run caches its tokenizer as `<workdir>/tokenizer.json` (`TOKENIZER_FILE`): training
writes it beside config.json (`save_tokenizer`), and a resumed run or `eval.py` loads that
file instead of retraining (`bpe_tokenizer`), so the ids never change under a checkpoint.
Training on the ~2 MB sample takes a few seconds on 2 CPU cores.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np

from moejax.config import DataConfig
from moejax.config.choices import BPE_MIN_VOCAB, bpe_vocab_size  # noqa: F401 (re-exported)
from moejax.data.corpus import make_source
from moejax.data.tokenizer import HFTokenizer, make_tokenizer
from moejax.storage import as_path

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS = ("<|endoftext|>", "<pad>")  # ids 0 (eos = bos) and 1 (pad)
SAMPLE_BYTES = 2_000_000  # training text the merges are learnt from (~3 s on 2 CPU cores)
assert BPE_MIN_VOCAB == 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the specials


def training_sample(data_cfg: DataConfig, max_bytes: int = SAMPLE_BYTES) -> list[str]:
    """Train-split documents in a seeded random order (`data.shuffle_seed`) until
    `max_bytes` UTF-8 bytes; the same list on every call and every machine."""
    source = make_source(data_cfg, "train")
    order = np.random.default_rng(data_cfg.shuffle_seed).permutation(len(source))
    texts, total = [], 0
    for i in order:
        text = source[int(i)]
        texts.append(text)
        total += len(text.encode("utf-8", errors="replace"))
        if total >= max_bytes:
            break
    return texts


def train_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` of `vocab_size` ids learnt from `texts`.

    Deterministic: the trainer's merges depend only on the pair counts (ties broken by
    the pair itself), and the counts only on `texts`.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def bpe_tokenizer(data_cfg: DataConfig, workdir: str | os.PathLike | None,
                  *, train: bool = True) -> HFTokenizer:
    """The BPE tokenizer of `data.tokenizer = "bpe:N"` for a run in `workdir`.

    `<workdir>/tokenizer.json` when it exists (a resumed run, eval.py); otherwise, with
    `train`, a fresh one from `training_sample`, held in memory until `save_tokenizer`
    writes it (so a bad input still fails before anything is written). Raises ValueError
    when the cached file has another vocabulary size, or when it is missing and
    `train` is False (evaluation of a workdir that was never trained).
    """
    vocab_size = bpe_vocab_size(data_cfg.tokenizer)
    if vocab_size is None:
        raise ValueError(f"data.tokenizer={data_cfg.tokenizer!r} is not a 'bpe:N' tokenizer.")
    cached = None if workdir is None else _cache_path(workdir)
    if cached is not None and cached.exists():
        tok = HFTokenizer.from_json(cached.read_text(encoding="utf-8"), str(cached))
        if tok.vocab_size != vocab_size:
            raise ValueError(
                f"data.tokenizer={data_cfg.tokenizer!r}, but {cached} holds a BPE of "
                f"{tok.vocab_size} ids: keep the tokenizer of the run that wrote this "
                "workdir, or use a new --workdir.")
        return tok
    if not train:
        raise ValueError(f"data.tokenizer={data_cfg.tokenizer!r}: no {TOKENIZER_FILE} in "
                         f"workdir {os.fspath(workdir)!r}; train first (train.py --workdir "
                         "...), which writes it.")
    raw = train_bpe(training_sample(data_cfg), vocab_size)
    tok = HFTokenizer.from_json(raw.to_str(), f"{data_cfg.tokenizer} (trained, not saved)")
    tok.unsaved = True  # `save_tokenizer` writes it into the workdir
    return tok


def save_tokenizer(tokenizer: Any, workdir: str | os.PathLike) -> None:
    """Writes a BPE that `bpe_tokenizer` trained to `<workdir>/tokenizer.json` (once);
    does nothing for any other tokenizer."""
    if getattr(tokenizer, "unsaved", False):
        path = _cache_path(workdir)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tokenizer.to_json(), encoding="utf-8")
        tokenizer.unsaved = False


def _cache_path(workdir: str | os.PathLike) -> Any:
    return as_path(workdir) / TOKENIZER_FILE


def tokenizer_for_run(data_cfg: DataConfig, workdir: str | os.PathLike | None = None,
                      *, train: bool = True) -> Any:
    """The tokenizer of `data.tokenizer` for a run in `workdir`: 'byte', a tokenizer.json
    path (`make_tokenizer`), or 'bpe:N' (`bpe_tokenizer`: cached or freshly trained)."""
    if bpe_vocab_size(data_cfg.tokenizer) is not None:
        return bpe_tokenizer(data_cfg, workdir, train=train)
    return make_tokenizer(data_cfg.tokenizer)
