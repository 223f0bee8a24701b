"""The Weights & Biases tracker (moejax/train/wandb_tracker.py), in wandb's offline mode.

Offline runs are written under the workdir (`wandb/offline-run-*-<id>/run-<id>.wandb`):
a 7-byte header, then LevelDB-log blocks of 32 KiB holding wandb's `Record` protobufs.
wandb 0.31 has no Python reader of that file; `history` below is one, after wandb's own
record format (chunk header: crc32, length, type; type 1 = a whole record, 2/3/4 = first,
middle and last piece).
"""
from __future__ import annotations

import pathlib
import struct
import sys

import pytest
from conftest import small_config

from moejax.config import resolve
from moejax.storage import as_path
from moejax.train.metrics import MetricsWriter
from moejax.train.wandb_tracker import RUN_ID_FILE, check_available, open_tracker


def history(path: pathlib.Path) -> list[dict[str, str]]:
    """The `history` records (logged rows: name -> JSON value) of an offline run file."""
    from wandb.proto import wandb_internal_pb2

    data, pos, piece, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        piece += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(piece)
            piece = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: i.value_json
                             for i in record.history.item})
    return rows


def test_without_wandb_a_project_is_refused_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    check_available("")  # off: fine
    with pytest.raises(ValueError, match=r"train.wandb_project.*moejax\[wandb\]"):
        check_available("my-project")


def test_off_by_default(tmp_path):
    cfg = resolve(small_config())
    assert cfg.train.wandb_project == ""
    assert open_tracker(cfg, as_path(tmp_path), enabled=True) is None


def test_offline_run_logs_every_record_and_a_resume_continues_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = resolve(small_config("train.wandb_project='moejax-test'"))
    workdir = as_path(tmp_path / "run")
    workdir.mkdir()
    wandb = pytest.importorskip("wandb")
    for steps in ([1, 2], [2, 3]):  # a second start (resume) of the same workdir
        writer = MetricsWriter(workdir, tracker=open_tracker(cfg, workdir, enabled=True))
        for step in steps:
            writer.write(step, {"loss": 10.0 + step, "validation/bits_per_byte": 0.25})
        writer.close()
        # A resume is a new process: stop wandb's service as a process exit does (in one
        # process, wandb 0.31 sometimes leaves a second run of the same id empty).
        wandb.teardown()
    run_id = (workdir / RUN_ID_FILE).read_text().strip()
    runs = sorted((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(runs) == 2  # both starts wrote the same run id
    rows = [row for run in runs for row in history(run / f"run-{run_id}.wandb")]
    assert [(r["step"], r["loss"], r["validation/bits_per_byte"]) for r in rows] == [
        ("1", "11", "0.25"), ("2", "12", "0.25"), ("2", "12", "0.25"), ("3", "13", "0.25")]
    assert b'"embed_dim":64' in (runs[0] / f"run-{run_id}.wandb").read_bytes()  # the config
