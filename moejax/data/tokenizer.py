"""Tokenizers: raw UTF-8 bytes, or a HuggingFace `tokenizer.json`; plus byte-level baselines.

Every tokenizer satisfies `Tokenizer`: `encode(text)` gives token ids without any special
token (the pipeline appends `eos_id` to each document itself), `decode(ids)` skips special
tokens. `decoded_num_bytes` counts the UTF-8 bytes a sequence stands for, the denominator
of bits-per-byte; `unigram_bits_per_byte` is the byte-unigram baseline any LM must beat.
"""
from __future__ import annotations

import math
import pathlib
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

# Special-token spellings looked up in a tokenizer.json, most specific first.
PAD_TOKENS = ("<pad>", "[PAD]", "<|pad|>", "<｜pad｜>", "<|finetune_right_pad_id|>")
BOS_TOKENS = ("<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<bos>", "[CLS]",
              "<|startoftext|>", "<|endoftext|>")
EOS_TOKENS = ("<｜end▁of▁sentence｜>", "<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>",
              "[SEP]", "<|im_end|>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and evaluation need from a tokenizer."""

    vocab_size: int  # ids are in [0, vocab_size); the model's vocab must be >= this
    pad_id: int  # written where segment_ids == 0 (never a loss target)
    bos_id: int
    eos_id: int  # appended to every document by the pipeline

    def encode(self, text: str) -> Sequence[int] | np.ndarray:
        """Token ids of `text`, without special tokens."""

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`; special tokens are skipped."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 pad, 257 bos, 258 eos (vocab 259)."""

    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258

    def encode(self, text: str) -> np.ndarray:
        """int32 byte values of `text` encoded as UTF-8 (lone surrogates -> '?')."""
        data = text.encode("utf-8", errors="replace")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Bytes < 256 decoded as UTF-8 (invalid sequences -> U+FFFD); specials skipped."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A HuggingFace `tokenizers` tokenizer loaded from a local `tokenizer.json`.

    pad/bos/eos are found by name among common spellings (`PAD_TOKENS`, `BOS_TOKENS`,
    `EOS_TOKENS`). An end-of-sequence token is required (documents are separated by it);
    a missing bos falls back to eos (GPT-2 style) and a missing pad falls back to eos
    (padding is masked by segment_ids == 0, so its id never matters for the loss).
    """

    def __init__(self, path: str | pathlib.Path):
        import tokenizers  # imported here: only HF users pay for it

        file = pathlib.Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"data.tokenizer={str(path)!r}: no tokenizer.json at {str(file)!r}; use "
                "'byte', 'bpe:N' or the path of a HuggingFace tokenizer.json (or its folder).")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust error says what is wrong in the JSON
            raise ValueError(f"data.tokenizer={str(path)!r}: cannot load {file}: {e}") from e
        self._setup(tok, str(file))

    @classmethod
    def from_json(cls, text: str, name: str) -> "HFTokenizer":
        """A tokenizer from the text of a tokenizer.json; `name` says where it came from."""
        import tokenizers

        self = cls.__new__(cls)
        self._setup(tokenizers.Tokenizer.from_str(text), name)
        return self

    def to_json(self) -> str:
        """The tokenizer.json text of this tokenizer."""
        return self._tok.to_str()

    def _setup(self, tok: Any, name: str) -> None:
        self._tok = tok
        self.path = name
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        eos = self._find(EOS_TOKENS)
        if eos is None:
            raise ValueError(
                f"data.tokenizer={name!r}: found no end-of-sequence token among "
                f"{list(EOS_TOKENS)}; add one to the tokenizer (documents are separated by it).")
        self.eos_id = eos
        bos = self._find(BOS_TOKENS)
        self.bos_id = eos if bos is None else bos
        pad = self._find(PAD_TOKENS)
        self.pad_id = eos if pad is None else pad
        self.id_bytes = _byte_level_table(tok, self.vocab_size)

    def _find(self, names: Sequence[str]) -> int | None:
        for name in names:
            tid = self._tok.token_to_id(name)
            if tid is not None:
                return int(tid)
        return None

    def encode(self, text: str) -> np.ndarray:
        """int32 ids of `text`, with no special tokens added."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`; special tokens skipped."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self._tok.decode(ids, skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def make_tokenizer(spec: str) -> Tokenizer:
    """'byte' -> ByteTokenizer(); anything else is a tokenizer.json path (or its folder).

    'bpe:N' is trained per run: build it with `moejax.data.tokenizer_for_run`.
    """
    if spec == "byte":
        return ByteTokenizer()
    if not spec:
        raise ValueError("data.tokenizer='' is invalid: use 'byte', 'bpe:N' or a "
                         "tokenizer.json path.")
    if spec.startswith("bpe:"):
        raise ValueError(f"data.tokenizer={spec!r} is trained per run: use "
                         "moejax.data.tokenizer_for_run(cfg.data, workdir).")
    return HFTokenizer(spec)


def _byte_level_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable character -> the byte it stands for.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...)
    map to U+0100, U+0101, ... in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars = {b: b for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = 256 + n
    return {chr(c): b for b, c in chars.items()}


def _byte_level_table(tok: Any, vocab_size: int) -> list[bytes] | None:
    """For a byte-level tokenizer (ByteLevel decoder): the bytes each id stands for
    (b"" for special tokens); None for any other tokenizer."""
    from tokenizers import decoders

    if not isinstance(tok.decoder, decoders.ByteLevel):
        return None
    to_byte = _byte_level_unicode()
    added = tok.get_added_tokens_decoder()
    table = [b""] * vocab_size
    for token, tid in tok.get_vocab(with_added_tokens=True).items():
        if tid in added:
            table[tid] = b"" if added[tid].special else token.encode("utf-8")
        elif all(ch in to_byte for ch in token):
            table[tid] = bytes(to_byte[ch] for ch in token)
        else:
            return None  # not a byte-level vocabulary after all: fall back to decoding
    return table


def token_bytes(tokenizer: Tokenizer, ids: Sequence[int] | np.ndarray) -> bytes:
    """The UTF-8 bytes `ids` stand for, concatenated (special tokens stand for none).

    Exact for the byte tokenizer and for byte-level BPEs (each id is a fixed byte string,
    even where a character is split between ids or rows); otherwise the decoded text
    re-encoded as UTF-8.
    """
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if isinstance(tokenizer, ByteTokenizer):
        return arr[arr < 256].astype(np.uint8).tobytes()
    table = getattr(tokenizer, "id_bytes", None)
    if table is not None:
        return b"".join(table[i] for i in arr.tolist())
    return tokenizer.decode(arr).encode("utf-8", errors="replace")


def decoded_num_bytes(tokenizer: Tokenizer, ids: Sequence[int] | np.ndarray) -> int:
    """UTF-8 bytes that `ids` stand for (special tokens count 0): bits/byte denominator.

    `len(token_bytes(tokenizer, ids))`: exact for the byte tokenizer and byte-level BPEs.
    """
    arr = np.asarray(ids).reshape(-1)
    if isinstance(tokenizer, ByteTokenizer):
        return int(np.count_nonzero(arr < 256))
    return len(token_bytes(tokenizer, arr))


def _byte_counts(texts: Iterable[str]) -> np.ndarray:
    counts = np.zeros(256, dtype=np.int64)
    for text in texts:
        data = np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8)
        counts += np.bincount(data, minlength=256)
    return counts


def unigram_bits_per_byte(train_texts: Iterable[str], valid_texts: Iterable[str]) -> float:
    """Cross-entropy (bits/byte) on `valid_texts` of a byte-unigram model fit on `train_texts`.

    The model is p(b) = (count_train(b) + 1) / (n_train + 256) (add-one smoothing over the
    256 byte values). A language model whose validation bits/byte is not well below this
    has learnt nothing beyond byte frequencies.
    """
    train = _byte_counts(train_texts)
    valid = _byte_counts(valid_texts)
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ValueError("unigram_bits_per_byte: the validation texts hold no bytes.")
    log2_p = np.log2(train + 1.0) - math.log2(float(train.sum()) + 256.0)
    return float(-(valid * log2_p).sum() / n_valid)
