"""Boxes of safetensors tensors read from disk, dequantised per tile (FP8 blocks, FP4 groups).

A `.safetensors` file is an 8-byte header length, a JSON header (dtype, shape and byte
range of every tensor) and the row-major data. `read_box` reads one box of one tensor with
positioned reads (`os.pread`) of at most `CHUNK_BYTES` at a time: whole rows where the box
spans whole rows, else row by row down to the first axis whose rows fit a chunk. Nothing is
memory-mapped, so the process's resident memory grows by the box (plus one chunk), never
by the tensor: `safetensors.safe_open(framework="numpy").get_slice` cannot read FP8
(numpy has no float8 types; checked with safetensors 0.8.0) and maps whole files, whose
touched pages count in the process's RSS.

`Source` is one logical (dequantised) checkpoint tensor:
  * "plain": the stored values (floats as float32, integers as stored);
  * "fp8": e4m3/e5m2 `q` times one scale per `block` rows x columns (DeepSeek-V3's fp32
    `weight_scale_inv`, V4's e8m0 `.scale`): only the scale tiles that cover the box are
    read and expanded;
  * "fp4": V4 expert weights, int8 [out, in/2] holding two e2m1 values per byte (low nibble
    first) times an e8m0 scale per 32 input columns; logical shape [out, in].
The values equal those of the whole-tensor dequantisers (`safetensors_io.dequantize_fp8`,
`hf_v4.dequantize`) element for element: the same fp32 products.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Mapping
import ml_dtypes
import numpy as np

Box = tuple[tuple[int, int], ...]
CHUNK_BYTES = 64 << 20
ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
             "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
             "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
             "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
             "F8_E8M0": np.uint8}  # e8m0 kept as raw exponent bytes (see e8m0_to_float)
FP4_TABLE = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6],
                     np.float32)


@dataclass(frozen=True)
class Stored:
    """Where a tensor's bytes are: file, absolute byte offset, dtype, shape."""
    path: str
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]


def _pread(fd: int, size: int, offset: int) -> bytes:
    parts, done = [], 0
    while done < size:
        part = os.pread(fd, size - done, offset + done)
        if not part:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        parts.append(part)
        done += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _read_into(fd: int, out: np.ndarray, offset: int, shape: tuple[int, ...], box: Box,
               dtype: np.dtype) -> None:
    """out[...] = the `box` of the row-major array of `shape` at byte `offset`."""
    if not shape:
        out[...] = np.frombuffer(_pread(fd, dtype.itemsize, offset), dtype)[0]
        return
    row_items = math.prod(shape[1:])
    row_bytes = row_items * dtype.itemsize
    (lo, hi), rest = box[0], box[1:]
    whole_rows = all(b == (0, n) for b, n in zip(rest, shape[1:]))
    if whole_rows or row_bytes <= CHUNK_BYTES:
        step = max(1, CHUNK_BYTES // max(row_bytes, 1))
        cut = (slice(None),) + tuple(slice(a, b) for a, b in rest)
        for a in range(lo, hi, step):
            b = min(hi, a + step)
            raw = _pread(fd, (b - a) * row_bytes, offset + a * row_bytes)
            out[a - lo:b - lo] = np.frombuffer(raw, dtype).reshape((b - a,) + shape[1:])[cut]
        return
    for row in range(lo, hi):  # rows larger than a chunk: descend one axis
        _read_into(fd, out[row - lo], offset + row * row_bytes, shape[1:], rest, dtype)


def read_box(stored: Stored, box: Box) -> np.ndarray:
    """The `box` of a stored tensor, as stored (dtype included)."""
    out = np.empty(tuple(b - a for a, b in box), stored.dtype)
    if out.size == 0:
        return out
    fd = os.open(stored.path, os.O_RDONLY)
    try:
        _read_into(fd, out, stored.offset, stored.shape, box, stored.dtype)
    finally:
        os.close(fd)
    return out


def e8m0_to_float(scale: np.ndarray) -> np.ndarray:
    """Raw e8m0 bytes (uint8) -> 2^(b - 127); float scales pass through as float32."""
    if scale.dtype == np.uint8:
        return np.ldexp(np.float32(1), scale.astype(np.int32) - 127).astype(np.float32)
    return scale.astype(np.float32)


def _tiles(lo: int, hi: int, size: int) -> tuple[int, int]:
    return lo // size, -(-hi // size)


def _expanded(scale: np.ndarray, rows: tuple[int, int], cols: tuple[int, int],
              first: tuple[int, int], block: tuple[int, int]) -> np.ndarray:
    """Scale tiles (starting at tile `first`) repeated to elements rows x cols."""
    full = np.repeat(np.repeat(e8m0_to_float(scale), block[0], 0), block[1], 1)
    r0, c0 = rows[0] - first[0] * block[0], cols[0] - first[1] * block[1]
    return full[r0:r0 + rows[1] - rows[0], c0:c0 + cols[1] - cols[0]]


@dataclass(frozen=True)
class Source:
    """One logical checkpoint tensor: its stored weight, and its scale if quantised."""
    name: str
    weight: Stored
    kind: str = "plain"  # "plain" | "fp8" | "fp4"
    scale: Stored | None = None
    block: tuple[int, int] = (128, 128)  # fp8: rows x cols per scale; fp4: (1, 32)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.kind == "fp4":
            return self.weight.shape[:-1] + (2 * self.weight.shape[-1],)
        return self.weight.shape

    def check(self) -> None:
        """Raises ValueError when the scale's shape does not fit the weight's."""
        if self.scale is None:
            return
        rows, cols = self.shape
        expected = (-(-rows // self.block[0]), -(-cols // self.block[1]))
        if self.scale.shape != expected:
            raise ValueError(f"{self.name}: scale shape {self.scale.shape} does not match the "
                             f"weight {self.shape} with blocks {self.block} (expected "
                             f"{expected}).")

    def read(self, box: Box) -> np.ndarray:
        """The dequantised values of `box` (float32; integers as stored)."""
        if self.kind == "plain":
            value = read_box(self.weight, box)
            return value if np.issubdtype(value.dtype, np.integer) else value.astype(np.float32)
        rows, cols = box
        r_tiles = _tiles(*rows, self.block[0])
        c_tiles = _tiles(*cols, self.block[1])
        scale = read_box(self.scale, (r_tiles, c_tiles))
        scale = _expanded(scale, rows, cols, (r_tiles[0], c_tiles[0]), self.block)
        if self.kind == "fp8":
            return read_box(self.weight, box).astype(np.float32) * scale
        packed = read_box(self.weight, (rows, (cols[0] // 2, -(-cols[1] // 2)))).view(np.uint8)
        values = np.stack([FP4_TABLE[packed & 0xF], FP4_TABLE[packed >> 4]], -1)
        values = values.reshape(packed.shape[0], -1)
        start = cols[0] - 2 * (cols[0] // 2)
        return values[:, start:start + cols[1] - cols[0]] * scale



_ST_NAMES = {np.dtype(v): k for k, v in ST_DTYPES.items() if k != "F8_E8M0"}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """A .safetensors file of numpy / ml_dtypes arrays, FP8 included (which
    `safetensors.numpy.save_file` cannot write); uint8 is written as U8."""
    header, offset = {}, 0
    for name, array in tensors.items():
        nbytes = array.size * array.dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[np.dtype(array.dtype)], "shape": list(array.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).view(np.uint8).data)
