"""Compression baselines on the evaluated bytes: what a language model must beat.

`compression_baselines(data)` compresses `data` (the exact UTF-8 bytes that the held-out
bits/byte denominator counts, every evaluated row's target bytes concatenated in
(batch, row) order; `HeldOut(..., with_details=True)["evaluated_bytes"]`) with Python's
`gzip` at level 9 and `lzma` (xz container) at preset 9 | PRESET_EXTREME, and reports
8 x compressed size / len(data) for each, headers included. A model whose bits/byte is
above gzip's has learnt less about the text than a dictionary coder fitted on the
evaluated text itself.
"""
from __future__ import annotations

import gzip
import lzma


def gzip_bits_per_byte(data: bytes) -> float:
    """Bits per input byte of `gzip.compress(data, compresslevel=9)` (header included)."""
    return 8.0 * len(gzip.compress(data, compresslevel=9, mtime=0)) / _length(data)


def xz_bits_per_byte(data: bytes) -> float:
    """Bits per input byte of xz (`lzma`, preset 9 | PRESET_EXTREME; header included)."""
    compressed = lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
    return 8.0 * len(compressed) / _length(data)


def compression_baselines(data: bytes) -> dict[str, float]:
    """{"gzip_bits_per_byte", "xz_bits_per_byte"} of `data` (see the module doc)."""
    return {"gzip_bits_per_byte": gzip_bits_per_byte(data),
            "xz_bits_per_byte": xz_bits_per_byte(data)}


def _length(data: bytes) -> int:
    if not data:
        raise ValueError("compression baselines: no evaluated bytes to compress.")
    return len(data)
