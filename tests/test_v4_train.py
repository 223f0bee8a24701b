"""DeepSeek-V4 through the training stack: config resolution, train + checkpoint with Muon on
a sharded mesh, the frozen hash tables, FLOPs from the planner, generation."""
import dataclasses
import json

import jax
import numpy as np
import pytest
from conftest import ROOT

import moejax
from moejax.config import load_config, resolve
from moejax.eval.generate import generate
from moejax.config.v4 import V4Config
from moejax.model.v4.plan import plan_v4
from moejax.train import checkpoint, flops_per_token, make_setup, train_and_evaluate
from moejax.train.optimizer import decay_mask

V4_TINY = str(ROOT / "configs/deepseek_v4.py") + ":tiny"
# configs/deepseek_v4.py:tiny cut to 3 layers (one of each attention type), one hash layer,
# MTP on, and a short batch: every V4 path, the smallest compile.
SMALL_V4 = ["model.num_layers=3", "model.attention.layer_types=('sliding','csa','hca')",
            "model.moe.num_hash_layers=1", "model.max_seq_len=64", "train.batch_size=8",
            "train.seq_len=32", "train.log_every=1", "train.save_every=2",
            "train.eval_batches=1", "optimizer.warmup_steps=1"]


def v4_config(*overrides: str):
    return load_config(V4_TINY, [*SMALL_V4, *overrides])


def test_v4_config_file_resolves_to_a_v4_config():
    cfg = resolve(load_config(V4_TINY))
    assert isinstance(cfg.model, V4Config) and cfg.model.mtp.depth == 1
    assert isinstance(moejax.build_model(cfg.model), moejax.TransformerV4)
    plain = resolve(load_config(str(ROOT / "configs/tiny.py")))
    assert isinstance(moejax.build_model(plain.model), moejax.Transformer)


@pytest.mark.parametrize("override, field", [
    ("model.architecture='deepseek_v5'", "model.architecture"),
    ("model.attention.layer_types=('sliding','csa')", "model.attention.layer_types"),
    ("mesh.tensor=8", "model.attention.num_heads"),
    ("optimizer.name='lion'", "optimizer.name"),
    ("optimizer.muon_momentum=1.0", "optimizer.muon_momentum"),
])
def test_bad_v4_fields_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        resolve(load_config(V4_TINY, [override, "mesh.data=1"]))


def test_flops_per_token_comes_from_the_planner():
    cfg = resolve(v4_config())
    want = plan_v4(cfg.model, 32)["flops_per_token"]
    assert flops_per_token(cfg.model, 32) == want > 0


def test_v4_decay_mask_spares_biases_sinks_and_mhc_scalars():
    cfg = resolve(v4_config())
    model = moejax.build_model(cfg.model)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros((1, 8), "int32"))
    mask = decay_mask(boxed["params"], decay_embeddings=False)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    never = [k for k in flat if any(f"'{n}'" in k for n in
                                    ("position_bias", "sinks", "base", "scale", "embedding"))]
    assert len(never) > 20 and not any(flat[k] for k in never)
    layer1 = "['layers']['layers_1']"
    for matrix in ("['moe']['gate']", "['attention']['o_a']", "['attn_hc']['fn']",
                   "['attention']['indexer']['q_b']"):
        assert flat[layer1 + matrix], matrix


SHARDED = ("mesh.data=2", "mesh.expert=2", "mesh.tensor=2")


@pytest.mark.parametrize("mesh", [
    # ~1 min each of XLA:CPU compilation. In the default suite: the V4 train step by
    # test_indexer_loss.py::test_train_step_adds_the_indexer_loss_and_moves_the_indexer
    # (with the hash layer's bias row), Muon by test_v4.py's Muon tests, frozen tables
    # through a checkpoint by test_hf_v4_export.py::test_cli_import_then_export_...
    pytest.param((), marks=pytest.mark.slow),  # data=8
    pytest.param(SHARDED, marks=pytest.mark.slow),
])
def test_v4_trains_with_muon_and_checkpoints_its_hash_tables(tmp_path, mesh):
    """3 Muon steps: loss falls, the tid2eid tables are saved and never change, the hash
    layer's balance bias stays 0, and the state restores onto another mesh."""
    cfg = resolve(v4_config("train.steps=3", "optimizer.name='muon'",
                            "optimizer.learning_rate=0.01", *mesh))
    result = train_and_evaluate(cfg, tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "loss" in r]
    assert records[-1]["loss"] < records[0]["loss"] and np.isfinite(result["loss"])
    assert "mtp_cross_entropy" in records[-1]

    other = resolve(v4_config(*(SHARDED if not mesh else ("mesh.data=8",))))
    other_mesh = moejax.make_mesh(other.mesh)
    with moejax.use_mesh(other_mesh):
        setup = make_setup(dataclasses.replace(cfg, mesh=other.mesh), other_mesh)
        state = checkpoint.load_state(tmp_path, setup.abstract)
        earlier = checkpoint.load_state(tmp_path, setup.abstract, step=2)
    tables = jax.tree.leaves(state.frozen)
    assert tables and all(t.dtype == np.int32 for t in tables)
    jax.tree.map(np.testing.assert_array_equal, state.frozen, earlier.frozen)
    assert int(state.step) == 3 and int(earlier.step) == 2
    bias = np.asarray(state.moe_bias["bias"])  # layer 0 routes by hash: its row never moves
    assert not bias[0].any() and bias[1:].any()


def test_muon_momentum_is_sharded_like_its_parameters():
    cfg = resolve(v4_config("optimizer.name='muon'", *SHARDED))
    mesh = moejax.make_mesh(cfg.mesh)
    with moejax.use_mesh(mesh):
        setup = make_setup(cfg, mesh)
    gate = setup.shardings.params["layers"]["layers_1"]["moe"]["gate"]
    muon = setup.shardings.opt_state[1].inner_states["muon"].inner_state[0].mu
    assert muon["layers"]["layers_1"]["moe"]["gate"] == gate
    assert "expert" in str(gate.spec)


@pytest.mark.slow  # ~70 s of decode compilation; tests/test_v4.py checks cached decoding
def test_generate_from_a_v4_model():
    cfg = resolve(v4_config())
    model = moejax.build_model(cfg.model)
    variables = model.init(jax.random.key(0), jax.numpy.zeros((1, 8), "int32"))
    out = generate(cfg.model, variables, np.array([1, 2, 3], np.int32), num_samples=2,
                   max_new_tokens=5, rng=jax.random.key(1), temperature=0.0)
    assert out.shape == (2, 8) and (out[:, :3] == [1, 2, 3]).all()
    assert (out >= 0).all() and (out < cfg.model.vocab_size).all()
    assert (out[0] == out[1]).all()  # greedy: both samples agree

