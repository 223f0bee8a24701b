"""Runs that survive: the non-finite guard, preemption by SIGTERM, damaged checkpoints.

Every run shares the shapes of tests/test_train.py's TRAIN (one compiled program, cached).
"""
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
from moejax.config import resolve
from moejax.train import checkpoint, init_state, make_setup, train_and_evaluate
from moejax.train.guard import (Guard, NonFiniteError, _is_spike, check_guard, init_guard,
                                make_guarded_step)

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

def test_divergence_stops_nonzero_naming_the_step_and_saves_nothing_non_finite(tmp_path):
    """The issue's reproduction (lr 1e9, no clipping): exit 1 naming the step and the
    terms; every checkpoint left holds finite values only."""
    workdir = tmp_path / "run"
    done = subprocess.run(train_py_args(workdir, *DIVERGE, "train.steps=8",
                                        "train.save_every=1", "train.log_every=4"),
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    found = re.search(r"step (\d+) is not finite \(([^)]*)\)", message)
    assert found, message
    bad, terms = int(found.group(1)), found.group(2).split(", ")
    assert "loss" in terms and "grad_norm" in terms and "train.nonfinite='stop'" in message
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert steps and max(steps) < bad, (steps, bad)
    cfg = small_config(*TRAIN, *DIVERGE, "train.steps=8")
    for step in steps:
        assert _all_finite(_load(cfg, workdir, step)), step


def _batches(cfg, count):
    rng = np.random.default_rng(0)
    shape = (cfg.train.batch_size, cfg.train.seq_len)
    return [{"tokens": rng.integers(0, 256, shape).astype(np.int32),
             "segment_ids": np.ones(shape, np.int32),
             "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape)}
            for _ in range(count)]


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


@pytest.mark.parametrize("override, field", [
    ("train.nonfinite='ignore'", "train.nonfinite"),
    ("train.max_skipped_steps=-1", "train.max_skipped_steps"),
    ("train.spike_factor=0.5", "train.spike_factor"),
    ("train.spike_window=0", "train.spike_window")])
def test_guard_fields_are_validated_up_front(override, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        resolve(small_config(override))


# ----------------------------------------------------------------------------- preemption

def test_sigterm_saves_the_step_in_flight_and_the_resumed_run_is_bitwise_the_same(tmp_path):
    workdir, straight = tmp_path / "run", tmp_path / "straight"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            train_py_args(workdir, *CONSTANT[len(TRAIN):], "train.steps=100000",
                          "train.save_every=100000"),
            env=subprocess_env(), stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (workdir / "metrics.jsonl").exists() or len(_records(workdir)) < 3:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no steps were logged in time"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log.read_text()[-3000:]
    stopped = int(re.search(r"stopped by SIGTERM after step (\d+)", out).group(1))
    assert checkpoint.latest_step(workdir) == stopped >= 3
    resumed = train_and_evaluate(small_config(*CONSTANT, f"train.steps={stopped + 2}"),
                                 workdir)
    train_and_evaluate(small_config(*CONSTANT, f"train.steps={stopped + 2}"), straight)
    assert resumed["step"] == stopped + 2
    a, b = _records(workdir), _records(straight)
    assert sorted(a) == sorted(b) == list(range(1, stopped + 3))
    for step in a:
        for name in ("loss", "grad_norm", "moe/bias_norm"):
            assert a[step][name] == b[step][name], (step, name)


# ------------------------------------------------------------------- damaged checkpoints

@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A 4-step run saved at steps 2 and 4, and its final state."""
    workdir = tmp_path_factory.mktemp("two")
    cfg = small_config(*CONSTANT, "train.steps=4")
    train_and_evaluate(cfg, workdir)
    return cfg, workdir, _load(cfg, workdir, 4)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "config metadata cut short": lambda d: _truncate(d / "config" / "metadata"),
    "data item deleted": lambda d: shutil.rmtree(d / "data"),
    "state metadata cut short": lambda d: _truncate(d / "state" / "_METADATA"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumed(
        two_checkpoints, tmp_path, capfd, damage):
    cfg, original, final = two_checkpoints
    workdir = tmp_path / "run"
    shutil.copytree(original, workdir)
    DAMAGE[damage](workdir / "checkpoints" / "4")
    out = train_and_evaluate(cfg, workdir)
    err = capfd.readouterr().err
    assert out["step"] == 4
    assert re.search(r"checkpoint step 4 at \S+/checkpoints/4 does not restore", err), err
    assert (workdir / "checkpoints" / "4.corrupt-0").is_dir()  # set aside, not deleted
    jax.tree.map(np.testing.assert_array_equal, _load(cfg, workdir, 4), final)


def test_eval_loads_the_previous_checkpoint_and_a_model_change_is_still_refused(
        two_checkpoints, tmp_path):
    cfg, original, _ = two_checkpoints
    workdir = tmp_path / "run"
    shutil.copytree(original, workdir)
    DAMAGE["config metadata cut short"](workdir / "checkpoints" / "4")
    with pytest.raises(ValueError, match="model.moe.num_experts: 8 -> 4"):
        train_and_evaluate(small_config(*CONSTANT, "train.steps=6",
                                        "model.moe.num_experts=4"), workdir)
    assert (workdir / "checkpoints" / "4").is_dir()  # refused before anything moved
    resolved = resolve(cfg)
    mesh = moejax.make_mesh(resolved.mesh)
    with moejax.use_mesh(mesh):
        setup = make_setup(resolved, mesh)
        state, step = checkpoint.load_newest_state(workdir, setup.abstract, resolved)
    assert step == 2 and int(state.step) == 2
    assert (workdir / "checkpoints" / "4.corrupt-0").is_dir()
