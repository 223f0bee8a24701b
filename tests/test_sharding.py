"""Logical axis names on every parameter; sharded forwards equal the single-device one."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, small_config

import moejax
from moejax.sharding import (LOGICAL_AXES, RULES, logical_names, logical_to_spec,
                             param_spec)

# data=8 (plain data parallelism: every train test runs on it) and fsdp=8 (fsdp is split
# in the mixed mesh too) and data=2 x expert=4 (the mixed mesh splits experts too) are
# slow; the default suite checks the mixed mesh, which splits every axis.
MESHES = [pytest.param(dict(data=8), marks=pytest.mark.slow),
          pytest.param(dict(data=1, fsdp=8), marks=pytest.mark.slow),
          pytest.param(dict(data=2, expert=4), marks=pytest.mark.slow),
          dict(data=1, fsdp=2, expert=2, tensor=2)]


def test_every_parameter_has_one_logical_name_per_dimension():
    cfg = small_config()
    model = moejax.Transformer(moejax.model_config(cfg.model))
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    leaves = jax.tree_util.tree_leaves_with_path(
        abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) > 20
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no names"
        assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)
        assert all(name in LOGICAL_AXES for name in leaf.names), leaf.names


def test_rules_cover_the_vocabulary_once():
    names = [name for name, _ in RULES]
    assert sorted(names) == sorted(LOGICAL_AXES)


def test_logical_to_spec_uses_each_mesh_axis_once_and_drops_non_dividing_axes():
    mesh = moejax.make_mesh(moejax.MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
    spec = logical_to_spec(("act_batch", "act_group"), RULES, (8, 8), mesh)
    assert spec == jax.sharding.PartitionSpec(("data", "fsdp", "expert"), None)
    spec = logical_to_spec(("vocab", "embed"), RULES, (259, 64), mesh)
    assert spec == jax.sharding.PartitionSpec(None, ("fsdp", "expert"))
    spec = logical_to_spec(("vocab", "embed"), RULES, (259, 66), mesh)  # 66 % 4: fsdp only
    assert spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_state_axes_fall_back_to_a_dimension_they_divide():
    mesh = moejax.make_mesh(moejax.MeshConfig(data=1, fsdp=4, expert=2))
    # no name asks for fsdp or expert: both go to the largest dim they divide, never `layers`
    spec = param_spec(("layers", "heads", None), (64, 4, 24), mesh)
    assert spec == jax.sharding.PartitionSpec(None, "tensor", ("fsdp", "expert"))
    spec = param_spec((None, None), (5, 3), mesh)  # nothing divides: stays whole
    assert spec == jax.sharding.PartitionSpec(None, None)


# Small models whose dims all divide by fsdp x expert = 8: the MLA (DeepSeek-V3) and the
# DeepSeek-V4 attention, MoE, hyper-connections and MTP. Left out: RMSNorm scales (logical
# axes norm / layers only, kept whole by design: D floats per layer) and leaves below 64
# elements (per-head sinks, 3-vector scales), which cannot split 8 ways.
STATE_MODELS = {
    "v3_mla": ("deepseek_v3.py", "tiny", []),
    "v4": ("deepseek_v4.py", "tiny", []),
}


@pytest.mark.parametrize("name", sorted(STATE_MODELS))
def test_every_state_leaf_is_split_over_all_devices(name):
    from moejax.config import load_config
    from moejax.train.state import make_setup
    path, arg, overrides = STATE_MODELS[name]
    cfg = moejax.resolve(load_config(f"{ROOT}/configs/{path}:{arg}",
                                     ["mesh.data=1", "mesh.fsdp=4", "mesh.expert=2",
                                      "optimizer.name='adamw'", *overrides]))
    mesh = moejax.make_mesh(cfg.mesh)
    with moejax.use_mesh(mesh, cfg):
        setup = make_setup(cfg, mesh)
    boxed = jax.eval_shape(setup.model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    norm_only = [jax.tree_util.keystr(p) for p, names in jax.tree_util.tree_leaves_with_path(
        logical_names(boxed["params"]), is_leaf=lambda x: isinstance(x, tuple))
        if set(names) <= {"norm", "layers"}]
    trees = {"params": setup.abstract.params, "opt_state": setup.abstract.opt_state}
    checked, offenders = 0, []
    for label, tree in trees.items():
        for path_, leaf in jax.tree_util.tree_leaves_with_path(tree):
            key = jax.tree_util.keystr(path_)
            if leaf.size < 64 or any(key.endswith(n) for n in norm_only):
                continue
            checked += 1
            shard = math.prod(leaf.sharding.shard_shape(leaf.shape))
            if shard * mesh.size != leaf.size:
                offenders.append(f"{label}{key} {leaf.shape} "
                                 f"{leaf.sharding.spec}")
    assert checked > 40
    assert not offenders, "\n".join(offenders)


@pytest.fixture(scope="module")
def reference():
    cfg = small_config("model.moe.dispatch='index'", "model.moe.capacity_factor=0.0")
    model = moejax.Transformer(moejax.model_config(cfg.model))
    tokens = jax.random.randint(jax.random.key(1), (8, 32), 0, 128)
    one = moejax.make_mesh(moejax.MeshConfig(data=1), devices=jax.devices()[:1])
    variables = moejax.init_variables(model, cfg, one, jax.random.key(0))
    with moejax.use_mesh(one, cfg):
        logits, aux = jax.jit(model.apply)(variables, tokens)
    return cfg, model, tokens, np.asarray(logits), jax.tree.map(np.asarray, aux)


@pytest.mark.parametrize("axes", MESHES, ids=["data=8", "data=1,fsdp=8", "data=2,expert=4",
                                              "data=1,fsdp=2,expert=2,tensor=2"])
def test_sharded_forward_equals_single_device(reference, axes):
    cfg, model, tokens, ref_logits, ref_aux = reference
    mesh = moejax.make_mesh(moejax.MeshConfig(**axes))
    variables = moejax.init_variables(model, cfg, mesh, jax.random.key(0))
    with moejax.use_mesh(mesh, cfg):
        logits, aux = jax.jit(model.apply)(variables, tokens)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=2e-5)
    np.testing.assert_allclose(np.asarray(aux["expert_load"]), ref_aux["expert_load"],
                               atol=1e-6)
    gate = variables["params"]["moe_stack"]["layers"]["moe"]["gate"]  # [L, E, D, F]
    shard_shape = gate.sharding.shard_shape(gate.shape)
    assert shard_shape[1] == gate.shape[1] // axes.get("expert", 1)
    assert shard_shape[2] == gate.shape[2] // axes.get("fsdp", 1)
    assert shard_shape[3] == gate.shape[3] // axes.get("tensor", 1)
    if axes.get("expert", 1) > 1:  # each device really holds only its experts
        shard = gate.addressable_shards[0].data
        assert shard.shape[1] == gate.shape[1] // axes["expert"]


@pytest.mark.parametrize("dispatch", ["einsum", "dense"])
def test_other_dispatches_on_expert_mesh_equal_the_reference(reference, dispatch):
    _, _, tokens, ref_logits, _ = reference
    cfg = small_config(f"model.moe.dispatch='{dispatch}'", "model.moe.capacity_factor=0.0")
    model = moejax.Transformer(moejax.model_config(cfg.model))
    mesh = moejax.make_mesh(moejax.MeshConfig(data=2, expert=4))
    variables = moejax.init_variables(model, cfg, mesh, jax.random.key(0))
    with moejax.use_mesh(mesh, cfg):
        logits, _ = jax.jit(model.apply)(variables, tokens)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=2e-5)


def test_dropping_is_the_same_sharded_and_unsharded():
    cfg = small_config("model.moe.dispatch='index'", "model.moe.capacity_factor=0.75")
    model = moejax.Transformer(moejax.model_config(cfg.model))
    tokens = jax.random.randint(jax.random.key(2), (8, 32), 0, 128)
    results = []
    for axes, devices in [(dict(data=1), jax.devices()[:1]), (dict(data=2, expert=4), None)]:
        mesh = moejax.make_mesh(moejax.MeshConfig(**axes), devices=devices)
        variables = moejax.init_variables(model, cfg, mesh, jax.random.key(0))
        with moejax.use_mesh(mesh, cfg):
            logits, aux = jax.jit(model.apply)(variables, tokens)
        results.append((np.asarray(logits), np.asarray(aux["dropped_fraction"])))
    assert (results[0][1] > 0).all()
    np.testing.assert_allclose(results[1][0], results[0][0], atol=2e-5)
    np.testing.assert_array_equal(results[1][1], results[0][1])


def test_mesh_errors_name_the_problem():
    with pytest.raises(ValueError, match="8 are present"):
        moejax.make_mesh(moejax.MeshConfig(data=3, fsdp=1))
    with pytest.raises(ValueError, match="mesh.data=-1"):
        moejax.make_mesh(moejax.MeshConfig(data=-1, fsdp=3))
