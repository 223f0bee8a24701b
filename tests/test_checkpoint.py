"""Checkpoints: exact resume, resume after SIGKILL, another mesh, incompatible workdirs."""
import json
import os
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
from moejax.train import checkpoint, make_setup, train_and_evaluate

# Same schedule whatever train.steps is, so "N steps, then N more" is the same run as 2N.
RESUME = [*TRAIN, "optimizer.decay='constant'"]


def _records(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def _load(cfg, workdir, **mesh_axes):
    cfg = resolve(cfg)
    mesh = moejax.make_mesh(moejax.MeshConfig(**mesh_axes))
    with moejax.use_mesh(mesh):
        setup = make_setup(cfg, mesh)
        return setup, checkpoint.load_state(workdir, setup.abstract)


def _tree_snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run saved on the default mesh (data=8)."""
    workdir = tmp_path_factory.mktemp("trained")
    cfg = small_config(*RESUME, "train.steps=2")
    train_and_evaluate(cfg, workdir)
    return cfg, workdir


@pytest.mark.slow  # test_faults' SIGTERM test stops at step 3 and resumes bitwise to step 6
def test_resume_is_bitwise_identical_to_a_straight_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    out = train_and_evaluate(small_config(*RESUME, "train.steps=4"), straight)
    train_and_evaluate(small_config(*RESUME, "train.steps=2"), split)
    resumed = train_and_evaluate(small_config(*RESUME, "train.steps=4"), split)
    assert out["step"] == resumed["step"] == 4
    a, b = _records(straight), _records(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for name in ("loss", "grad_norm", "moe/bias_norm"):
            assert a[step][name] == b[step][name], (step, name)
    cfg = small_config(*RESUME, "train.steps=4")
    _, state_a = _load(cfg, straight, data=8)
    _, state_b = _load(cfg, split, data=8)
    assert int(state_a.step) == int(state_b.step) == 4
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state_a), jax.device_get(state_b))


def test_restore_onto_a_different_mesh(trained):
    cfg, workdir = trained
    _, saved = _load(cfg, workdir, data=8)
    setup, other = _load(cfg, workdir, data=1, fsdp=2, expert=2, tensor=2)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(saved.params),
                 jax.device_get(other.params))
    up = other.params["moe_stack"]["layers"]["moe"]["up"]
    assert up.sharding == setup.shardings.params["moe_stack"]["layers"]["moe"]["up"]
    assert up.sharding.spec[1] == "expert"
    np.testing.assert_array_equal(jax.device_get(saved.moe_bias["bias"]),
                                  jax.device_get(other.moe_bias["bias"]))


def test_incompatible_model_config_is_refused_and_nothing_is_touched(trained):
    _, workdir = trained
    before = _tree_snapshot(workdir)
    with pytest.raises(ValueError, match="model.moe.num_experts: 8 -> 4"):
        train_and_evaluate(small_config(*RESUME, "train.steps=4", "model.moe.num_experts=4"),
                           workdir)
    assert _tree_snapshot(workdir) == before


def test_platform_choices_may_change_between_a_checkpoint_and_its_resume():
    """How the experts run (e.g. expert_parallel 'gspmd' saved before 'auto' existed) is
    not part of the model; the expert count is."""
    saved = {"moe": {"expert_parallel": "gspmd", "expert_transport": "auto",
                     "dropless_backend": "auto", "num_experts": 8}}
    now = {"moe": {"expert_parallel": "auto", "expert_transport": "all_gather",
                   "dropless_backend": "bulk", "num_experts": 8}}
    assert checkpoint.model_differences(saved, now) == []
    assert checkpoint.model_differences(saved, {"moe": {**now["moe"], "num_experts": 4}}) == [
        "model.moe.num_experts: 8 -> 4"]


@pytest.mark.slow  # ~45 s: a subprocess run killed mid-training, then resumed
def test_sigkill_mid_run_resumes_from_the_last_complete_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(train_py_args(workdir, "train.steps=1000", "train.log_every=50"),
                                env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 300
        while checkpoint.latest_step(workdir) is None:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint was completed in time"
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    last = checkpoint.latest_step(workdir)
    assert last is not None and last < 1000
    done = subprocess.run(train_py_args(workdir, f"train.steps={last + 2}"),
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from the checkpoint at step {last}" in done.stdout
    assert json.loads(done.stdout[done.stdout.rindex("{\n"):])["step"] == last + 2
    assert checkpoint.latest_step(workdir) == last + 2
