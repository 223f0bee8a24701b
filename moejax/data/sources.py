"""Document sources: random-access sequences of str documents, one split each.

Every source has `len()` and `__getitem__(i) -> str` (grain's `RandomAccessDataSource`
protocol), is built for one split ("train" or "validation"), indexes its input up front
(names, byte offsets, record counts; never the text) and reads documents lazily.

Splits are stable: a document is in validation iff a hash of its *key* maps below
`data.validation_fraction`. Keys are relative paths (builtin / text, relative to the
glob's fixed directory prefix), "relpath:line" (jsonl) or "relpath:record" (arrayrecord),
so the split does not depend on file order, on the Python process (no `hash()`), or on
where the corpus directory lives.

`data.path` may be a URL (gs://bucket/corpus/*.jsonl): text and jsonl files are then
listed and read through `etils.epath` (moejax/storage.py); ArrayRecord files must be local.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import pathlib
import sysconfig
from typing import Any, Sequence

import numpy as np
from etils import epath

from moejax.storage import is_url

SPLITS = ("train", "validation")
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                           "__pycache__"})
_U64 = np.uint64
_WHITESPACE = np.frombuffer(b" \t\n\r\x0b\x0c", dtype=np.uint8)


def key_fraction(key: str) -> float:
    """Stable uniform value in [0, 1) for `key`: first 8 bytes of sha1(key) / 2**64."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic), vectorised."""
    x = x.astype(_U64, copy=True)
    x ^= x >> _U64(30)
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(27)
    x *= _U64(0x94D049BB133111EB)
    x ^= x >> _U64(31)
    return x


def item_fractions(file_key: str, n: int) -> np.ndarray:
    """Stable values in [0, 1) for items 0..n-1 of one file (vectorised hash of (file, i))."""
    seed = int.from_bytes(hashlib.sha1(file_key.encode("utf-8")).digest()[:8], "big")
    with np.errstate(over="ignore"):
        mixed = _mix64(np.arange(n, dtype=_U64) + _U64(seed))
    return (mixed >> _U64(11)).astype(np.float64) / 2.0**53


def _keep(fractions: np.ndarray | float, split: str, validation_fraction: float):
    valid = np.asarray(fractions) < validation_fraction
    return valid if split == "validation" else ~valid


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: use one of {list(SPLITS)}.")


def _glob_url(pattern: str) -> tuple[Any, list[str]]:
    """`glob_files` for a URL pattern, through epath."""
    scheme, rest = pattern.split("://", 1)
    parts = rest.split("/")
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    root = epath.Path(f"{scheme}://{'/'.join(fixed)}")
    relative = "/".join(parts[len(fixed):])
    files = sorted(os.fspath(p) for p in root.glob(relative) if p.is_file())
    return root, files


def glob_files(pattern: str, source: str) -> tuple[Any, list[str]]:
    """(fixed directory prefix of `pattern`, sorted matching files) or a ValueError."""
    if is_url(pattern):
        root, files = _glob_url(pattern)
    else:
        root, files = None, sorted(p for p in glob.glob(os.path.expanduser(pattern),
                                                        recursive=True) if os.path.isfile(p))
    if not files:
        raise ValueError(f"no files match data.path={pattern!r} (data.source={source!r}); "
                         "check the glob (use '**' to recurse into folders).")
    if root is not None:
        return root, files
    parts = pathlib.Path(os.path.expanduser(pattern)).parts
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    root = pathlib.Path(*fixed) if fixed else pathlib.Path(".")
    return root, files


def _relative(path: str, root: Any) -> str:
    if is_url(path):
        return path[len(os.fspath(root).rstrip("/")) + 1:]
    return os.path.relpath(path, root).replace(os.sep, "/")


def _open(path: str):
    """A binary file object for a local path or a URL (epath)."""
    if is_url(path):
        return epath.Path(path).open("rb")
    return open(path, "rb")


class FileDocuments:
    """One document per file (builtin and text sources); files read lazily as UTF-8."""

    def __init__(self, root: Any, rel_paths: Sequence[str], name: str):
        self.root = root if is_url(root) else pathlib.Path(root)  # epath.Path for URLs
        self.rel_paths = list(rel_paths)
        self.name = name

    def __len__(self) -> int:
        return len(self.rel_paths)

    def __getitem__(self, index: int) -> str:
        return (self.root / self.rel_paths[index]).read_bytes().decode("utf-8",
                                                                        errors="replace")

    def __repr__(self) -> str:
        return f"{self.name}({len(self)} documents under {str(self.root)!r})"


def stdlib_files() -> tuple[pathlib.Path, list[str]]:
    """(stdlib root, sorted relative paths of its .py files, tests and site-packages excluded)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    rel = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                rel.append(_relative(os.path.join(dirpath, name), root))
    return root, sorted(rel)


def builtin_source(split: str, validation_fraction: float) -> FileDocuments:
    """The running interpreter's standard-library .py files (~12 MB), one per document."""
    _check_split(split)
    root, rel = stdlib_files()
    keep = [p for p in rel if _keep(key_fraction(p), split, validation_fraction)]
    return FileDocuments(root, keep, f"builtin[{split}]")


def text_source(pattern: str, split: str, validation_fraction: float) -> FileDocuments:
    """Every file matching the glob `pattern` is one document."""
    _check_split(split)
    root, files = glob_files(pattern, "text")
    rel = [_relative(f, root) for f in files]
    keep = [p for p in rel if _keep(key_fraction(p), split, validation_fraction)]
    return FileDocuments(root, keep, f"text[{split}]")


def _json_text(raw: bytes, text_field: str, where: str) -> str:
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{where}: not valid JSON ({e}); data.source='jsonl' expects one "
                         "JSON object per line.") from e
    if not isinstance(obj, dict) or text_field not in obj:
        fields = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{where}: no field data.text_field={text_field!r} "
                         f"(the record has {fields}); set data.text_field.")
    value = obj[text_field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field data.text_field={text_field!r} holds a "
                         f"{type(value).__name__}, expected a string.")
    return value


def _line_number(path: str, offset: int, chunk: int = 1 << 24) -> int:
    """1-based number of the line starting at byte `offset` of `path`."""
    newlines, pos = 0, 0
    with _open(path) as f:
        while pos < offset and (buf := f.read(min(chunk, offset - pos))):
            newlines += buf.count(b"\n")
            pos += len(buf)
    return newlines + 1


class JsonlSource:
    """One document per non-blank line of JSON Lines files: the line's `text_field`.

    Indexing stores only (file, start, end) byte offsets of the split's lines; the first
    line of each file is parsed up front so a wrong `data.text_field` fails at start-up.
    Reads use `os.pread`, safe from grain's reader threads.
    """

    def __init__(self, pattern: str, text_field: str, split: str, validation_fraction: float):
        _check_split(split)
        root, self.files = glob_files(pattern, "jsonl")
        self.text_field = text_field
        file_ids, starts, ends = [], [], []
        for fid, path in enumerate(self.files):
            s, e = self._line_offsets(path)
            if len(s):
                with _open(path) as f:
                    f.seek(int(s[0]))
                    _json_text(f.read(int(e[0] - s[0])), text_field, f"{path}:line 1")
            keep = _keep(item_fractions(_relative(path, root), len(s)), split,
                         validation_fraction)
            file_ids.append(np.full(int(keep.sum()), fid, np.int32))
            starts.append(s[keep])
            ends.append(e[keep])
        self.file_ids = np.concatenate(file_ids)
        self.starts = np.concatenate(starts)
        self.ends = np.concatenate(ends)
        self.name = f"jsonl[{split}]"
        self._fds: dict[int, int] = {}

    @staticmethod
    def _line_offsets(path: str, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
        """Start and end byte offsets of the non-blank lines of `path` (read in chunks)."""
        starts, ends, has_text = [], [], []
        pos, carry_start, carry_text = 0, 0, False
        with _open(path) as f:
            while buf := f.read(chunk):
                data = np.frombuffer(buf, dtype=np.uint8)
                text = np.concatenate([[0], np.cumsum(~np.isin(data, _WHITESPACE))])
                nl = np.flatnonzero(data == 10)
                piece_start = np.concatenate([[0], nl + 1])
                piece_text = text[np.concatenate([nl, [len(data)]])] > text[piece_start]
                if len(nl):
                    starts += [[carry_start], pos + piece_start[1:-1]]
                    ends.append(pos + nl)
                    has_text += [[carry_text or piece_text[0]], piece_text[1:-1]]
                    carry_start, carry_text = pos + int(nl[-1]) + 1, bool(piece_text[-1])
                else:
                    carry_text = carry_text or bool(piece_text[0])
                pos += len(data)
        starts.append([carry_start])
        ends.append([pos])
        has_text.append([carry_text])
        keep = np.concatenate(has_text).astype(bool)
        return (np.concatenate(starts).astype(np.int64)[keep],
                np.concatenate(ends).astype(np.int64)[keep])

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> str:
        fid = int(self.file_ids[index])
        start, end = int(self.starts[index]), int(self.ends[index])
        if is_url(self.files[fid]):  # a handle per read: safe from grain's reader threads
            with _open(self.files[fid]) as f:
                f.seek(start)
                raw = f.read(end - start)
        else:
            fd = self._fds.get(fid)
            if fd is None:
                fd = self._fds[fid] = os.open(self.files[fid], os.O_RDONLY)
            raw = os.pread(fd, end - start, start)
        try:
            return _json_text(raw, self.text_field, f"{self.files[fid]} (byte {start})")
        except ValueError as e:  # name the line: count newlines before it (errors only)
            line = _line_number(self.files[fid], start)
            raise ValueError(str(e).replace(f" (byte {start})", f":line {line}", 1)) from e

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = {}  # file descriptors do not cross processes
        return state

    def __repr__(self) -> str:
        return f"{self.name}({len(self)} documents in {len(self.files)} files)"


class ArrayRecordSource:
    """One document per ArrayRecord record: UTF-8 text, or a JSON object with `text_field`.

    The format is detected from the first record of the first non-empty file: a record
    that parses as a JSON object is JSON (then every record must be), otherwise UTF-8.
    """

    def __init__(self, pattern: str, text_field: str, split: str, validation_fraction: float):
        import grain
        from array_record.python.array_record_module import ArrayRecordReader

        _check_split(split)
        if is_url(pattern):
            raise ValueError(f"data.path={pattern!r}: ArrayRecord files must be local (the "
                             "reader opens files by name); copy them or use jsonl/text.")
        root, self.files = glob_files(pattern, "arrayrecord")
        self.text_field = text_field
        keys, offset = [], 0
        for path in self.files:
            try:
                reader = ArrayRecordReader(path)
                n = reader.num_records()
                reader.close()
            except Exception as e:  # the C++ reader raises RuntimeError / ValueError
                raise ValueError(f"data.path: {path} is not an ArrayRecord file ({e}).") from e
            keep = _keep(item_fractions(_relative(path, root), n), split, validation_fraction)
            keys.append(np.flatnonzero(keep) + offset)
            offset += n
        self.keys = np.concatenate(keys).astype(np.int64)
        self._records = grain.sources.ArrayRecordDataSource(self.files) if offset else None
        self.is_json = offset > 0 and self._detect_json(self._records[0])
        self.name = f"arrayrecord[{split}]"

    @staticmethod
    def _detect_json(record: bytes) -> bool:
        if not record.lstrip().startswith(b"{"):
            return False
        try:
            return isinstance(json.loads(record), dict)
        except ValueError:
            return False

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> str:
        key = int(self.keys[index])
        record = self._records[key]
        if self.is_json:
            return _json_text(record, self.text_field, f"arrayrecord record {key}")
        return record.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"{self.name}({len(self)} documents in {len(self.files)} files)"
