"""Faults from outside the process, all `slow`: kill -9 at any moment, a signal mid-save,
a full disk during a save, data files corrupted mid-run (README "When things go wrong").
Each train.py run is bounded by subprocess timeouts; every run has the shapes of
tests/test_faults.py's straight run (one compiled program, cached).
"""
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import small_config, subprocess_env
from test_faults import (CONSTANT, _assert_same_run, _checkpoint_steps, _load,  # noqa: F401
                         _records, _snapshot, straight)
from test_train import train_py_args

from moejax.data.sources import JsonlSource
from moejax.train import checkpoint, train_and_evaluate


# ----------------------------------------------------------- kill -9, SIGTERM, a full disk

# Runs the command after it with SIGXFSZ ignored and no file allowed past argv[1] bytes (both
# survive exec); a write past the limit then fails with EFBIG, as one on a full disk would.
LIMIT_FILE_SIZE = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, "
                   "signal.SIG_IGN); n = int(sys.argv[1]); resource.setrlimit("
                   "resource.RLIMIT_FSIZE, (n, n)); os.execv(sys.argv[2], sys.argv[2:])")


def _launch(workdir, log, *overrides, limit_file_size=None):
    """train.py on the straight run's config (`overrides` after it), stderr to `log`
    (stdout to `log`.stdout);
    with `limit_file_size`, no file it writes may grow past that many bytes."""
    args = train_py_args(workdir, "optimizer.decay=constant", *overrides)
    if limit_file_size:
        args = [sys.executable, "-c", LIMIT_FILE_SIZE, str(limit_file_size), *args]
    with open(log, "a") as stderr, open(f"{log}.stdout", "a") as stdout:
        return subprocess.Popen(args, env=subprocess_env(), stdout=stdout, stderr=stderr,
                                text=True)


def _wait_for(proc, log, condition, timeout=240):
    """Polls `condition()` every millisecond until it holds; fails if `proc` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out waiting for train.py"
        time.sleep(0.001)


def _logged(workdir):
    try:
        return max(_records(workdir), default=0)
    except (FileNotFoundError, json.JSONDecodeError):  # a line being written
        return 0


def _saving(workdir):
    """Steps whose asynchronous save is being written (Orbax's temporary folders)."""
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return [int(p.name.split(".")[0]) for p in directory.glob("*.orbax-checkpoint-tmp")]


def _kill(proc, how=signal.SIGKILL, timeout=120):
    try:
        proc.send_signal(how)
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _assert_lost_at_most_one_save_in_flight(workdir, logged, save_every):
    """Lost: the steps after the newest complete checkpoint. The step logged last may have
    a save in flight when the process dies, so at most that save's interval, plus the
    steps since it, are lost: under 2 x save_every."""
    kept = checkpoint.latest_step(workdir) or 0
    assert logged - kept < 2 * save_every, (logged, kept)
    return logged - kept


@pytest.mark.slow  # ~1-2 min: train.py three times
def test_kill_9_at_random_moments_then_resume_gives_the_same_run(straight, tmp_path):
    """Seeded: each kill comes a random 0-1.5 s after a random logged step (1-4), which
    lands mid-step, mid-log or mid-save; the last run completes the straight run."""
    rng = np.random.default_rng(16)
    workdir, log = tmp_path / "run", tmp_path / "stderr.txt"
    lost = []
    for _ in range(2):
        proc = _launch(workdir, log, "train.steps=6")
        try:
            target = int(rng.integers(1, 5))
            _wait_for(proc, log, lambda: _logged(workdir) >= target)
            time.sleep(float(rng.uniform(0.0, 1.5)))
        finally:
            code = _kill(proc)
        if code == 0:  # it finished before the kill: nothing to check for this round
            continue
        assert code == -signal.SIGKILL
        lost.append(_assert_lost_at_most_one_save_in_flight(workdir, _logged(workdir), 2))
    assert lost, "no kill landed before the run finished"
    print(f"steps lost per kill: {lost}")
    train_and_evaluate(straight[0], workdir)
    _assert_same_run(workdir, straight)


@pytest.mark.slow  # ~1 min: train.py once, then the rest of the run in this process
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_signal_mid_save_then_resume_gives_the_same_run(straight, tmp_path, how):
    """The signal lands while an asynchronous save's temporary folder exists (polled every
    millisecond, a save every step, step 3 or later). SIGKILL: that save is lost, the one before it
    restores, and a resume ignores the leftover folder. SIGTERM: the save completes, the
    step in flight is saved too, exit 0."""
    workdir, log = tmp_path / "run", tmp_path / "stderr.txt"
    proc = _launch(workdir, log, "train.steps=100000", "train.save_every=1")
    try:
        _wait_for(proc, log, lambda: max(_saving(workdir), default=0) >= 3)
        in_flight = max(_saving(workdir))
    finally:
        code = _kill(proc, how)
    assert in_flight < 6, "the run went past the straight run before the save was seen"
    if how == signal.SIGKILL:
        assert code == -signal.SIGKILL
        kept = checkpoint.latest_step(workdir)  # a save starts once the one before ended
        assert kept == in_flight - 1, (in_flight, kept)  # one save interval lost
        print(f"killed while saving step {in_flight}; kept step {kept}")
    else:
        assert code == 0, log.read_text()[-3000:]
        stopped = checkpoint.latest_step(workdir)
        assert stopped >= in_flight and not _saving(workdir)
        assert f"stopped by SIGTERM after step {stopped};" in Path(f"{log}.stdout").read_text()
    train_and_evaluate(straight[0], workdir)
    _assert_same_run(workdir, straight)


@pytest.mark.slow  # ~30 s: four steps in this process, then train.py
def test_a_full_disk_during_a_save_fails_naming_the_folder_and_keeps_the_previous_one(
        straight, tmp_path):
    """Steps 1-4 saved normally; then train.py (saving every 6 steps) may write no file
    over 32 KiB (config.json and metrics fit, a checkpoint's array file does not): the
    save of step 6 fails in Orbax's writer thread, and the run stops within a step or two
    of it (before step 12, when the next save would have found the failure), exits 1
    naming the folder and the kept step 4, which restores; a resume with space completes
    the straight run."""
    workdir, log = tmp_path / "run", tmp_path / "stderr.txt"
    train_and_evaluate(small_config(*CONSTANT, "train.steps=4"), workdir)
    proc = _launch(workdir, log, "train.steps=40", "train.save_every=6",
                   limit_file_size=32 << 10)
    try:
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 1, log.read_text()[-3000:]
    # Orbax's writer threads may log their tracebacks after train.py's own last line.
    message = [line for line in log.read_text().splitlines()
               if line.startswith("train.py: ")][-1]
    assert message.startswith(f"train.py: the checkpoint of step 6 could not be written to "
                              f"{workdir}/checkpoints ("), message
    assert "File too large" in message and "step 4, is kept" in message, message
    assert 6 <= max(_records(workdir)) < 12, sorted(_records(workdir))
    assert checkpoint.latest_step(workdir) == 4
    jax.tree.map(np.testing.assert_array_equal, _load(straight[0], workdir, 4), straight[3])
    assert train_and_evaluate(straight[0], workdir)["step"] == 6
    jax.tree.map(np.testing.assert_array_equal, _load(straight[0], workdir, 6), straight[4])


@pytest.mark.slow  # ~15 s: four steps, then a resume that fails at its first batch
def test_a_bad_jsonl_record_met_mid_run_stops_naming_it_and_keeps_the_checkpoints(tmp_path):
    """After 4 steps (saved at 2 and 4) every train record but the first (line 1 is checked
    at start-up; validation records are read at start-up too) is overwritten in place, as
    many bytes long, by one whose text is a number: the resumed run restores step 4, then
    its first batch raises the ValueError naming file:line and field; checkpoints 2 and 4
    stay as they were."""
    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": f"record {i:04d} " * 12}) for i in range(400)]
    corpus.write_text("\n".join(lines) + "\n")
    data = ["data.source='jsonl'", f"data.path='{corpus}'", "data.validation_fraction=0.05"]
    workdir = tmp_path / "run"
    train_and_evaluate(small_config(*CONSTANT, *data, "train.steps=4"), workdir)
    held_out = JsonlSource(str(corpus), "text", "validation", 0.05).starts
    offsets = np.cumsum([0] + [len(line) + 1 for line in lines])[:-1]
    bad = [line if i == 0 or offsets[i] in held_out else json.dumps({"text": 7}).ljust(len(line))
           for i, line in enumerate(lines)]
    corpus.write_text("\n".join(bad) + "\n")
    before = _snapshot(workdir / "checkpoints")
    with pytest.raises(ValueError, match=re.escape(f"{corpus}:line ") + r"\d+: field "
                       r"data.text_field='text' holds a int, expected a string"):
        train_and_evaluate(small_config(*CONSTANT, *data, "train.steps=8"), workdir)
    assert _checkpoint_steps(workdir) == [2, 4]
    assert _snapshot(workdir / "checkpoints") == before
