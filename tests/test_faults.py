"""When things go wrong: the non-finite guard, preemption by SIGTERM, damaged checkpoints
and a read-only workdir (README "When things go wrong"; kill -9, a signal mid-save, a full
disk are in test_faults_outside.py; bad configs in test_config_fuzz.py, bad data files in
test_data_faults.py).

Every run shares the shapes of tests/test_train.py's TRAIN (one compiled program, cached).
"""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import small_config, subprocess_env
from test_train import TRAIN, train_py_args

import moejax
from moejax import data as moedata
from moejax.config import resolve
from moejax.train import checkpoint, init_state, make_setup, train_and_evaluate
from moejax.train.guard import (Guard, NonFiniteError, _is_spike, check_guard, guard_terms,
                                init_guard, make_guarded_step)
from moejax.train.preemption import Preemption

# Same schedule whatever train.steps is, so "N steps, then more" is the same run.
CONSTANT = [*TRAIN, "optimizer.decay='constant'"]
# The divergence of the issue: the loss is NaN from the second step on.
DIVERGE = ["optimizer.learning_rate=1e9", "optimizer.grad_clip_norm=0",
           "optimizer.warmup_steps=0"]


def _records(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def _load(cfg, workdir, step=None):
    cfg = resolve(cfg)
    mesh = moejax.make_mesh(cfg.mesh)
    with moejax.use_mesh(mesh):
        setup = make_setup(cfg, mesh)
        return jax.device_get(checkpoint.load_state(workdir, setup.abstract, step))


def _all_finite(tree):
    return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.inexact))


# ------------------------------------------------------------------------ non-finite guard

def _checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                  if p.name.isdigit())


def _assert_stopped_before_saving_non_finite(message, workdir, cfg):
    found = re.search(r"step (\d+) is not finite \(([^)]*)\)", message)
    assert found, message
    bad, terms = int(found.group(1)), found.group(2).split(", ")
    assert "loss" in terms and "grad_norm" in terms and "train.nonfinite='stop'" in message
    steps = _checkpoint_steps(workdir)
    assert steps and max(steps) < bad, (steps, bad)
    for step in steps:
        assert _all_finite(_load(cfg, workdir, step)), step


@pytest.mark.slow  # its own train-step compile (lr, clipping); the NaN-batch 'stop' test
def test_divergence_stops_naming_the_step_and_terms_and_saves_nothing_non_finite(tmp_path):
    """The issue's reproduction (lr 1e9, no clipping; NaN from step 2), a save every step:
    NonFiniteError naming the step and the terms; every checkpoint holds finite values."""
    cfg = small_config(*TRAIN, *DIVERGE, "train.steps=8", "train.save_every=1",
                       "train.log_every=4")
    with pytest.raises(NonFiniteError) as error:
        train_and_evaluate(cfg, tmp_path)
    _assert_stopped_before_saving_non_finite(str(error.value), tmp_path, cfg)


@pytest.mark.slow  # ~25 s: train.py in a subprocess
def test_train_py_exits_1_on_divergence(tmp_path):
    workdir = tmp_path / "run"
    done = subprocess.run(train_py_args(workdir, *DIVERGE, "train.steps=8",
                                        "train.save_every=1", "train.log_every=4"),
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("train.py: step "), message
    _assert_stopped_before_saving_non_finite(
        message, workdir, small_config(*TRAIN, *DIVERGE, "train.steps=8"))


def _batches(cfg, count):
    rng = np.random.default_rng(0)
    shape = (cfg.train.batch_size, cfg.train.seq_len)
    return [{"tokens": rng.integers(0, 256, shape).astype(np.int32),
             "segment_ids": np.ones(shape, np.int32),
             "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape)}
            for _ in range(count)]


@pytest.mark.slow  # its own train-step compile (skip policy, 2 micro-batches)
def test_skip_policy_keeps_the_state_of_a_non_finite_step_and_counts_it():
    """With gradient accumulation (2 micro-batches): the diverged step leaves params,
    optimizer state and balance biases bit for bit; more skips in a row than allowed trip."""
    cfg = resolve(small_config(*CONSTANT, *DIVERGE, "train.micro_batches=2",
                               "train.nonfinite='skip'", "train.max_skipped_steps=1"))
    mesh = moejax.make_mesh(cfg.mesh)
    with moejax.use_mesh(mesh):
        setup = make_setup(cfg, mesh)
        state, guard = init_state(setup, jax.random.key(0)), init_guard(cfg)
        step, key = make_guarded_step(setup, cfg), jax.random.key(1)
        history = []
        for batch in _batches(cfg, 3):
            before = jax.device_get(state)
            state, guard, metrics = step(state, guard, batch, key)
            history.append((before, jax.device_get((state, guard, metrics))))
    (_, (first, g1, m1)), (kept, (second, g2, m2)), (_, (_, g3, _)) = history
    assert np.isfinite(m1["loss"]) and int(g1.skipped) == 0 and _all_finite(first)
    assert not np.isfinite(m2["loss"]) or not np.isfinite(m2["grad_norm"])
    assert int(second.step) == 2 and int(g2.skipped) == 1 and float(m2["skipped_steps"]) == 1
    for name in ("params", "opt_state", "moe_bias"):
        jax.tree.map(np.testing.assert_array_equal, getattr(second, name),
                     getattr(kept, name))
    assert int(g2.tripped_step) == -1
    check_guard(cfg, g2, None)  # one skip is allowed
    assert int(g3.run) == 2 and int(g3.tripped_step) == 3
    with pytest.raises(NonFiniteError, match=r"step 3 made 2 skipped steps in a row .*"
                                             r"train.max_skipped_steps=1"):
        check_guard(cfg, g3, None)


def test_a_loss_spike_is_recognised_only_with_a_full_window():
    window = np.array([2.0, 3.0, 2.5, 100.0], np.float32)
    guard = Guard(np.int32(0), np.int32(0), np.int32(-1), np.int32(0), window, np.int32(4))
    assert bool(_is_spike(guard, np.float32(8.0), 2.5))  # median 2.75: 8 > 6.875
    assert not bool(_is_spike(guard, np.float32(8.0), 3.0))  # 8 < 8.25
    assert not bool(_is_spike(guard.replace(filled=np.int32(3)), np.float32(1e6), 2.5))
    cfg = resolve(small_config("train.spike_factor=2.5", "train.max_skipped_steps=2"))
    spikes = guard.replace(tripped_step=np.int32(9),
                           tripped_terms=np.int32(1 << len(guard_terms(cfg))))
    with pytest.raises(NonFiniteError, match=r"step 9 made 3 skipped steps in a row "
                                             r"\(its bad terms: loss_spike\)"):
        check_guard(cfg, spikes, 4)


@pytest.mark.parametrize("override, field", [
    ("train.nonfinite='ignore'", "train.nonfinite"),
    ("train.max_skipped_steps=-1", "train.max_skipped_steps"),
    ("train.spike_factor=0.5", "train.spike_factor"),
    ("train.spike_window=0", "train.spike_window")])
def test_guard_fields_are_validated_up_front(override, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        resolve(small_config(override))


def _corrupt_batch(monkeypatch, number, token):
    """The train iterator's batch `number` gets `token` (out of the vocabulary: its
    embedding row is NaN, jnp.take's fill) in row 0, position 5."""
    make = moedata.make_train_iterator

    def make_corrupting(*args, **kwargs):
        iterator = make(*args, **kwargs)
        real_next, count = type(iterator).__next__, [0]

        def corrupting_next(self):
            batch, count[0] = real_next(self), count[0] + 1
            if count[0] == number:
                batch = {**batch, "tokens": batch["tokens"].copy()}
                batch["tokens"][0, 5] = token
            return batch
        iterator.__class__ = type("Corrupting", (type(iterator),),
                                  {"__next__": corrupting_next})
        return iterator
    monkeypatch.setattr(moedata, "make_train_iterator", make_corrupting)


# 'stop' runs the straight run's compiled step; 'skip' compiles its own (slow).
@pytest.mark.parametrize("policy", ["stop", pytest.param("skip", marks=pytest.mark.slow)])
def test_nan_injected_into_one_batch_stops_or_is_skipped(tmp_path, monkeypatch, policy):
    """One corrupted token in batch 3 makes that step's loss NaN. 'stop': the run ends
    naming step 3, checkpoints 1 and 2 (finite) kept, nothing else lost. 'skip': step 3
    changes nothing (checkpoint 3 holds checkpoint 2's parameters, optimizer state and
    biases), is counted, and the run goes on to step 6 with finite losses."""
    cfg = small_config(*CONSTANT, "train.steps=6", "train.save_every=1",
                       "train.keep_checkpoints=10", f"train.nonfinite='{policy}'")
    _corrupt_batch(monkeypatch, 3, 384)  # model.vocab_size=384 (TRAIN)
    if policy == "stop":
        with pytest.raises(NonFiniteError) as error:
            train_and_evaluate(cfg, tmp_path)
        _assert_stopped_before_saving_non_finite(str(error.value), tmp_path, cfg)
        assert "step 3 is not finite" in str(error.value)
        assert _checkpoint_steps(tmp_path) == [1, 2]
        return
    assert train_and_evaluate(cfg, tmp_path)["step"] == 6
    records = _records(tmp_path)
    assert [records[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]  # a total
    assert all(np.isfinite(records[s]["loss"]) for s in (1, 2, 4, 5, 6))
    two, three = _load(cfg, tmp_path, 2), _load(cfg, tmp_path, 3)
    for name in ("params", "opt_state", "moe_bias"):
        jax.tree.map(np.testing.assert_array_equal, getattr(three, name),
                     getattr(two, name))
    assert all(_all_finite(_load(cfg, tmp_path, s)) for s in _checkpoint_steps(tmp_path))


# ---------------------------------------------------------------------- shared straight run

@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A 6-step run saved at steps 4 and 6 (keep_checkpoints=2): config, workdir, records,
    the state of step 4 and the final state."""
    workdir = tmp_path_factory.mktemp("straight")
    cfg = small_config(*CONSTANT, "train.steps=6")
    train_and_evaluate(cfg, workdir)
    assert _checkpoint_steps(workdir) == [4, 6]
    return cfg, workdir, _records(workdir), _load(cfg, workdir, 4), _load(cfg, workdir, 6)


def _assert_same_run(workdir, straight):
    cfg, _, records, _, final = straight
    got = _records(workdir)
    assert sorted(got) == sorted(records) == [1, 2, 3, 4, 5, 6]
    for step in got:
        for name in ("loss", "grad_norm", "moe/bias_norm"):
            assert got[step][name] == records[step][name], (step, name)
    jax.tree.map(np.testing.assert_array_equal, _load(cfg, workdir, 6), final)


# ----------------------------------------------------------------------------- preemption

def _signal_on_batch(monkeypatch, number):
    """The train iterator sends this process SIGTERM while producing batch `number`."""
    make = moedata.make_train_iterator

    def make_signalling(*args, **kwargs):
        iterator = make(*args, **kwargs)
        real_next, count = type(iterator).__next__, [0]

        def signalling_next(self):
            count[0] += 1
            if count[0] == number:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_next(self)
        iterator.__class__ = type("Signalling", (type(iterator),),
                                  {"__next__": signalling_next})
        return iterator
    monkeypatch.setattr(moedata, "make_train_iterator", make_signalling)


def test_sigterm_saves_the_step_in_flight_and_the_resumed_run_is_bitwise_the_same(
        straight, tmp_path, monkeypatch, capfd):
    cfg, handler = straight[0], signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        _signal_on_batch(patch, 3)
        out = train_and_evaluate(cfg, tmp_path)
    assert out["step"] == 3 and out["preempted"] == signal.SIGTERM
    assert "SIGTERM: saving the checkpoint of step 3 and stopping" in capfd.readouterr().out
    assert checkpoint.latest_step(tmp_path) == 3
    assert signal.getsignal(signal.SIGTERM) == handler  # put back
    assert train_and_evaluate(cfg, tmp_path)["step"] == 6
    _assert_same_run(tmp_path, straight)


def test_a_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    with Preemption() as preemption:
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.stop_after_this_step() and exits == []
        os.kill(os.getpid(), signal.SIGINT)
    assert exits == [128 + signal.SIGINT]


def test_every_process_stops_after_the_same_step():
    """The synchronised answer (an all-reduce, read one step late) on one process."""
    preemption = Preemption(synchronise=True)
    answers = []
    for step in range(5):
        if step == 2:
            preemption.signal = signal.SIGTERM
        answers.append(preemption.stop_after_this_step())
    assert answers == [False, False, False, True, True]


def test_a_failed_save_on_any_process_stops_every_process_at_the_same_step():
    """A background save failure is agreed like a signal (one step late when
    synchronised), and marks the stop as a failed save (stop without saving)."""
    for synchronise, first in ((True, 3), (False, 2)):
        preemption = Preemption(synchronise=synchronise)
        answers = [(preemption.stop_after_this_step(save_failed=step >= 2),
                    preemption.save_failed) for step in range(5)]
        assert answers == [(False, False)] * first + [(True, True)] * (5 - first)
        assert preemption.signal is None


@pytest.mark.slow  # ~40 s: train.py in a subprocess, then two runs in this process
def test_sigterm_to_train_py_saves_and_the_resumed_run_is_bitwise_the_same(straight,
                                                                           tmp_path):
    workdir = tmp_path / "run"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            train_py_args(workdir, "optimizer.decay=constant", "train.steps=100000",
                          "train.save_every=100000"),
            env=subprocess_env(), stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (workdir / "metrics.jsonl").exists() or len(_records(workdir)) < 1:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no steps were logged in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log.read_text()[-3000:]
    stopped = int(re.search(r"stopped by SIGTERM after step (\d+)", out).group(1))
    assert checkpoint.latest_step(workdir) == stopped
    assert stopped < 6, "the run went past the straight run before the signal landed"
    train_and_evaluate(straight[0], workdir)
    _assert_same_run(workdir, straight)


# ------------------------------------------------------------------- damaged checkpoints

def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "config metadata cut short": lambda d: _truncate(d / "config" / "metadata"),
    "data item deleted": lambda d: shutil.rmtree(d / "data"),
    "state metadata cut short": lambda d: _truncate(d / "state" / "_METADATA"),
    "state array file cut short": lambda d: _truncate(max(
        (d / "state").rglob("d/*"), key=lambda p: p.stat().st_size)),
}


def _damaged_copy(straight, tmp_path, damage):
    workdir = tmp_path / "run"
    shutil.copytree(straight[1], workdir)
    DAMAGE[damage](workdir / "checkpoints" / "6")
    return workdir


def _restore_newest(cfg, workdir):
    """What train.py's start does: (state, step) restored through a manager and iterator."""
    cfg = resolve(cfg)
    mesh = moejax.make_mesh(cfg.mesh)
    iterator = moedata.make_train_iterator(cfg.data, moedata.make_tokenizer(cfg.data.tokenizer),
                                           cfg.train.seq_len, cfg.train.batch_size)
    manager = checkpoint.make_manager(workdir, cfg.train.keep_checkpoints)
    try:
        with moejax.use_mesh(mesh):
            state, step = checkpoint.restore_newest(manager, make_setup(cfg, mesh).abstract,
                                                    iterator, cfg)
        return jax.device_get(state), step
    finally:
        checkpoint.close(manager)
        iterator.close()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_restored(
        straight, tmp_path, capfd, damage):
    workdir = _damaged_copy(straight, tmp_path, damage)
    state, step = _restore_newest(straight[0], workdir)
    assert step == 4
    jax.tree.map(np.testing.assert_array_equal, state, straight[3])
    err = capfd.readouterr().err
    assert re.search(r"checkpoint step 6 at \S+/checkpoints/6 does not restore", err), err
    assert (workdir / "checkpoints" / "6.corrupt-0").is_dir()  # set aside, not deleted
    assert not (workdir / "checkpoints" / "6").exists()


@pytest.mark.slow  # ~10 s; the default tests restore past each damage without training
def test_training_resumes_past_a_damaged_checkpoint_to_the_same_state(straight, tmp_path):
    """The issue's case: checkpoints/<newest>/config/metadata cut short."""
    workdir = _damaged_copy(straight, tmp_path, "config metadata cut short")
    assert train_and_evaluate(straight[0], workdir)["step"] == 6
    assert (workdir / "checkpoints" / "6.corrupt-0").is_dir()
    jax.tree.map(np.testing.assert_array_equal, _load(straight[0], workdir, 6), straight[4])


def test_eval_uses_the_previous_checkpoint_and_a_model_change_is_still_refused(
        straight, tmp_path):
    cfg = straight[0]
    workdir = _damaged_copy(straight, tmp_path, "config metadata cut short")
    with pytest.raises(ValueError, match="model.moe.num_experts: 8 -> 4"):
        train_and_evaluate(small_config(*CONSTANT, "train.steps=8",
                                        "model.moe.num_experts=4"), workdir)
    assert (workdir / "checkpoints" / "6").is_dir()  # refused before anything moved
    assert checkpoint.check_compatible(workdir, resolve(cfg)) == 4  # 6's config unreadable
    resolved = resolve(cfg)
    mesh = moejax.make_mesh(resolved.mesh)
    with moejax.use_mesh(mesh):
        setup = make_setup(resolved, mesh)
        state, step = checkpoint.load_newest_state(workdir, setup.abstract, resolved)
    assert step == 4 and int(state.step) == 4
    assert (workdir / "checkpoints" / "6.corrupt-0").is_dir()


@pytest.mark.slow  # ~5 min on 2 cores: two processes compile side by side
def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(tmp_path):
    """Only process 1 gets SIGTERM; both stop after the same step (their save is one
    collective Orbax checkpoint, which completes only if they agree) and exit 0."""
    from test_multiprocess import MESHES, SHARD_MAP, launch, script_args, wait_all
    workdir, log = tmp_path / "run", tmp_path / "log"
    procs = launch(script_args("train.py", workdir, [
        *MESHES[SHARD_MAP], "train.steps=100000", "train.save_every=100000"]), 2, 4, log)
    try:
        deadline = time.monotonic() + 800
        while not (workdir / "metrics.jsonl").exists() or len(_records(workdir)) < 1:
            assert all(p.poll() is None for p in procs), (tmp_path / "log.0").read_text()
            assert time.monotonic() < deadline, "no steps were logged in time"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)
        codes = wait_all(procs, log, timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [(tmp_path / f"log.{i}").read_text() for i in range(2)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    stopped = int(re.search(r"stopped by a signal to another process after step (\d+)",
                            logs[0]).group(1))
    assert "SIGTERM: finishing the step in flight" in logs[1]
    assert checkpoint.latest_step(workdir) == stopped
    assert max(_records(workdir)) == stopped


# ------------------------------------------------------------------------ read-only workdir

@contextlib.contextmanager
def _read_only(path):
    """`path` and everything in it read-only: chmod for a user, `chattr +i` for root (whom
    permission bits do not stop); put back afterwards."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    if shutil.which("chattr") is None or subprocess.run(
            ["chattr", "-R", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-R", "-i", str(path)], check=True)


def _snapshot(path):
    return {p.relative_to(path): p.read_bytes() if p.is_file() else None
            for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("holds", ["nothing", "checkpoints"])
def test_a_read_only_workdir_is_an_error_naming_it_before_any_training(request, tmp_path,
                                                                       holds):
    """Nothing trained, nothing in it changed (train.py: exit 1 with this message)."""
    workdir = tmp_path / "run"
    if holds == "checkpoints":
        shutil.copytree(request.getfixturevalue("straight")[1], workdir)
    else:
        workdir.mkdir()
    before = _snapshot(workdir)
    with _read_only(workdir), pytest.raises(ValueError, match=re.escape(
            f"workdir {str(workdir)!r} cannot be written: ") + r".*" + re.escape(
            f"({workdir}/") + r".*Nothing was trained"):
        train_and_evaluate(small_config(*CONSTANT, "train.steps=8"), workdir)
    assert _snapshot(workdir) == before
