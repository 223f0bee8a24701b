"""Where a run reads and writes: local folders or URLs, always through `etils.epath`.

A workdir may be a local folder or any URL epath resolves (`gs://` and `s3://` through
fsspec / gcsfs / s3fs or TensorFlow's gfile, and schemes registered with epath); every
file moejax writes (config.json, metrics.jsonl, TensorBoard events, eval.json,
imported_config.py) and the checkpoint folder go through `epath.Path`, so nothing turns
`gs://b/run` into a local folder `gs:/b/run` the way `pathlib.Path` does.

Checkpoints: Orbax writes its metadata through epath but the arrays through TensorStore,
whose kvstore is `gcs` for `gs://` and `file` for absolute local paths (orbax-checkpoint
0.12, `serialization/tensorstore_utils.build_kvstore_tspec`); so checkpoints work on local
disks (GCSFuse mounts included) and on `gs://`, and `checkpoint_dir` says so for others.
"""
from __future__ import annotations

import io
import os
from typing import Any

from etils import epath

PathLike = str | os.PathLike


def is_url(path: PathLike | epath.Path) -> bool:
    """Whether `path` names remote storage (`scheme://...`) rather than a local file."""
    return "://" in os.fspath(path)


def as_path(path: PathLike | epath.Path) -> epath.Path:
    """`path` as an epath.Path; local paths are made absolute (Orbax needs them so)."""
    if is_url(path):
        return epath.Path(os.fspath(path))
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


class JsonLines:
    """An append-only text file: appended in place locally; remote objects (which cannot
    be appended to) are rewritten whole on each write, as tensorboardX does for gs://."""

    def __init__(self, path: epath.Path):
        self.path = path
        self._remote = is_url(path)
        self._text = io.StringIO()
        if self._remote and path.exists():
            self._text.write(path.read_text())
        self._file = None if self._remote else path.open("a")

    def write(self, line: str) -> None:
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
            return
        self._text.write(line)
        self.path.write_text(self._text.getvalue())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class _EpathRecordWriter:
    """tensorboardX record writer onto an epath URL (buffered, rewritten on flush)."""

    def __init__(self, path: str):
        self.path, self.buffer = epath.Path(path), io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EpathRecordWriterFactory:
    def open(self, path: str) -> _EpathRecordWriter:
        return _EpathRecordWriter(path)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def tensorboard_writer(logdir: epath.Path) -> Any:
    """A tensorboardX SummaryWriter for `logdir`; URLs are written through epath."""
    # Imported here, not at module level: tensorboardX imports torch when it is installed
    # (2.4 s of `import moejax`, python -X importtime on a 2-core AMD EPYC), and only a run
    # that logs needs it.
    from tensorboardX import SummaryWriter, record_writer
    if is_url(logdir):
        scheme = os.fspath(logdir).split("://", 1)[0]
        record_writer.register_writer_factory(scheme, _EpathRecordWriterFactory())
    return SummaryWriter(os.fspath(logdir))


__all__ = ["JsonLines", "as_path", "is_url", "tensorboard_writer"]
