"""The sequence-tiled cross-entropy (custom VJP) equals the plain one: values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax.train.cross_entropy import (chunked_cross_entropy, reference_cross_entropy,
                                        tile_size)


def _inputs(dtype=jnp.float32, b=4, length=24, d=16, v=40):
    k = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(k[0], (b, length, d), dtype)
    w = (jax.random.normal(k[1], (d, v), jnp.float32) * 0.5).astype(dtype)
    targets = jax.random.randint(k[2], (b, length), 0, v)
    weights = (jax.random.uniform(k[3], (b, length)) > 0.3).astype(jnp.float32)
    return h, w, targets, weights


@pytest.mark.parametrize("chunk", [5, 8, 24])
def test_tiled_equals_plain_values_and_grads(chunk):
    h, w, targets, weights = _inputs()
    chunk = tile_size(h.shape[1], chunk)
    ref, ref_grads = jax.value_and_grad(reference_cross_entropy, (0, 1))(h, w, targets, weights)
    out, grads = jax.jit(jax.value_and_grad(chunked_cross_entropy, (0, 1)),
                         static_argnums=4)(h, w, targets, weights, chunk)
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-5)


def test_tile_size_divides_the_length():
    assert tile_size(24, 5) == 4
    assert tile_size(4096, 512) == 512
    assert tile_size(24, 0) == 24 and tile_size(24, 100) == 24


def test_bf16_inputs_on_a_sharded_mesh_match_fp32_reference():
    h, w, targets, weights = _inputs(jnp.bfloat16, b=8, length=32)
    mesh = moejax.make_mesh(moejax.MeshConfig(data=1, fsdp=4, expert=2))
    ref, ref_grads = jax.value_and_grad(reference_cross_entropy, (0, 1))(
        h.astype(jnp.float32), w.astype(jnp.float32), targets, weights)
    with moejax.use_mesh(mesh):
        out, grads = jax.jit(jax.value_and_grad(chunked_cross_entropy, (0, 1)),
                             static_argnums=4)(h, w, targets, weights, 8)
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=2e-2, rtol=2e-2)


def _step(config: str, loss_chunk: int, batch: dict) -> tuple[dict, dict]:
    from conftest import ROOT
    from moejax.config import load_config
    from moejax.train import init_state, make_setup, make_train_step
    cfg = moejax.resolve(load_config(
        f"{ROOT}/configs/{config}", ["train.batch_size=4", "train.seq_len=16",
                                     "optimizer.warmup_steps=0", "mesh.data=1",
                                     f"train.loss_chunk={loss_chunk}"]))
    mesh = moejax.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    with moejax.use_mesh(mesh):
        setup = make_setup(cfg, mesh)
        state = init_state(setup, jax.random.key(0))
        state, metrics = make_train_step(setup, cfg)(state, batch, jax.random.key(1))
    return jax.device_get(state.params), jax.device_get(metrics)


# Slow (two train-step compiles each): the default suite checks the tiled loss against the
# plain one in values and gradients, sharded and not (the tests above).
@pytest.mark.slow
@pytest.mark.parametrize("config", ["deepseek_v3.py:tiny", "deepseek_v4.py:tiny"])
def test_train_step_with_tiled_loss_equals_whole_logits(config):
    """Main and MTP heads (targets t+1 and t+2, packed documents): same loss and update."""
    rng = np.random.default_rng(0)
    segment_ids = np.ones((4, 16), np.int32)
    segment_ids[:, 11:] = 2
    segment_ids[0, 14:] = 0  # padding
    batch = {"tokens": rng.integers(0, 256, size=(4, 16)).astype(np.int32),
             "segment_ids": segment_ids,
             "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1))}
    ref_params, ref = _step(config, 0, batch)
    params, metrics = _step(config, 5, batch)  # tiles of 4 positions (5 does not divide 16)
    for name in ("loss", "cross_entropy", "mtp_cross_entropy", "grad_norm"):
        np.testing.assert_allclose(metrics[name], ref[name], rtol=1e-5, err_msg=name)
    # Adam's first step moves each weight by ~lr (3e-3) whatever the gradient's size, so a
    # near-zero gradient entry summed in another order can move by up to 1.7e-5 (seen);
    # a wrong gradient moves it by ~2 x lr.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=6e-5),
                 params, ref_params)
