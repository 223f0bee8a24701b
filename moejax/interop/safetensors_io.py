"""Reading and writing safetensors checkpoints one tensor at a time, and FP8 dequantisation.

`CheckpointReader` indexes a HuggingFace folder (one `*.safetensors` file, or shards listed
by `model.safetensors.index.json`) and reads single tensors through `safetensors.safe_open`
(memory-mapped). numpy has no FP8 types, so FP8 tensors (e4m3 / e5m2) are read from the
file's own header offsets as `ml_dtypes` arrays instead.

DeepSeek-V3's released weights are FP8 e4m3 with an fp32 `weight_scale_inv` per 128x128
block: W[i, j] = q[i, j] * scale_inv[i // 128, j // 128] (HF `Fp8Dequantize`).

`ShardedWriter` writes tensors into shards of bounded size, so an export never holds more
than one shard beyond the model itself, plus the index when there is more than one shard.
"""
from __future__ import annotations

import json
import pathlib
import struct
from typing import Any

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"  # "x.weight" -> "x.weight_scale_inv"
RAW_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def dequantize_fp8(q: np.ndarray, scale_inv: np.ndarray,
                   block: tuple[int, int] = (128, 128)) -> np.ndarray:
    """fp32 q * scale_inv, one scale per block of `block` rows x columns (ragged edges)."""
    out_dim, in_dim = q.shape
    rows, cols = block
    expected = (-(-out_dim // rows), -(-in_dim // cols))
    if scale_inv.shape != expected:
        raise ValueError(f"FP8 scale shape {scale_inv.shape} does not match weight "
                         f"{q.shape} with blocks {block} (expected {expected}).")
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), rows, 0), cols, 1)
    return q.astype(np.float32) * scale[:out_dim, :in_dim]


class CheckpointReader:
    """Tensor name -> file map of a safetensors checkpoint; reads tensors one by one."""

    def __init__(self, directory: str | pathlib.Path) -> None:
        self.directory = pathlib.Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: self.directory / v for k, v in weight_map.items()}
        else:
            paths = sorted(self.directory.glob("*.safetensors"))
            if not paths:
                raise FileNotFoundError(f"{self.directory}: no *.safetensors file and no "
                                        f"{INDEX_FILE}; is this a HuggingFace checkpoint?")
            self.files = {}
            for path in paths:
                for name in self._header(path)[0]:
                    if name != "__metadata__":
                        self.files[name] = path
        self._headers: dict[pathlib.Path, tuple[dict[str, Any], int]] = {}
        self._handles: dict[pathlib.Path, Any] = {}

    def names(self) -> list[str]:
        return sorted(self.files)

    def by_file(self) -> dict[pathlib.Path, list[str]]:
        """Names grouped by the file holding them (read file by file)."""
        groups: dict[pathlib.Path, list[str]] = {}
        for name, path in sorted(self.files.items()):
            groups.setdefault(path, []).append(name)
        return groups

    @staticmethod
    def _header(path: pathlib.Path) -> tuple[dict[str, Any], int]:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            return json.loads(f.read(size)), 8 + size

    def _info(self, name: str) -> tuple[dict[str, Any], int]:
        path = self.files[name]
        if path not in self._headers:
            self._headers[path] = self._header(path)
        header, base = self._headers[path]
        return header[name], base

    def locate(self, name: str) -> tuple[pathlib.Path, str, list[int], int]:
        """(file, safetensors dtype name, shape, absolute byte offset of the data)."""
        if name not in self.files:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.directory}.")
        info, base = self._info(name)
        return self.files[name], info["dtype"], info["shape"], base + info["data_offsets"][0]

    def read(self, name: str) -> np.ndarray:
        """The tensor as stored (FP8 as ml_dtypes arrays)."""
        if name not in self.files:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.directory}.")
        info, base = self._info(name)
        path = self.files[name]
        if info["dtype"] in RAW_DTYPES:
            start, end = info["data_offsets"]
            raw = np.fromfile(path, dtype=np.uint8, count=end - start, offset=base + start)
            return raw.view(RAW_DTYPES[info["dtype"]]).reshape(info["shape"])
        if path not in self._handles:
            from safetensors import safe_open  # the optional `hf` extra, needed from here

            self._handles[path] = safe_open(str(path), framework="np")
        return self._handles[path].get_tensor(name)

    def read_float(self, name: str, block: tuple[int, int] = (128, 128)) -> np.ndarray:
        """The tensor, dequantised when stored as FP8 with a `<name>_scale_inv` beside it."""
        tensor = self.read(name)
        if tensor.dtype in tuple(np.dtype(t) for t in RAW_DTYPES.values()):
            scale = name + SCALE_SUFFIX
            if scale not in self.files:
                raise ValueError(f"{name} is FP8 but {scale} is missing from the checkpoint.")
            return dequantize_fp8(tensor, self.read(scale), block)
        return tensor

    def close(self) -> None:
        self._handles.clear()


class ShardedWriter:
    """Writes named arrays into safetensors shards of at most `max_shard_bytes` each."""

    def __init__(self, directory: str | pathlib.Path, max_shard_bytes: int = 4 << 30,
                 enabled: bool = True) -> None:
        self.directory = pathlib.Path(directory)
        self.enabled = enabled  # False: takes the tensors, writes nothing (other processes)
        if enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[pathlib.Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if not self.enabled:
            return
        array = np.ascontiguousarray(array)
        if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = array
        self._pending_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self._shards):05d}.tmp"
        from safetensors.numpy import save_file  # the optional `hf` extra, needed from here

        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[pathlib.Path]:
        """Writes the last shard, names the files as HF does, writes the index if sharded."""
        if not self.enabled:
            return []
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            final = self.directory / SINGLE_FILE
            self._shards[0][0].rename(final)
            return [final]
        weight_map, paths = {}, []
        for i, (tmp, names) in enumerate(self._shards):
            final = self.directory / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp.rename(final)
            paths.append(final)
            weight_map.update({k: final.name for k in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
        return paths
