"""Training: loss masking, optimizer (mask, schedule), gradient accumulation, train.py."""
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, SMALL_MODEL, read_events, small_config, subprocess_env

import moejax
from moejax.config import OptimizerConfig, load_config, resolve
from moejax.train import (decay_mask, flops_per_token, init_state, learning_rate_schedule,
                          make_setup, make_train_step, target_mask,
                          train_and_evaluate)
from moejax.train.loss import batch_loss, loss_metrics, shifted_nll, target_counts
from moejax.train.optimizer import decays

# Training overrides shared by every training test (same shapes -> same compiled programs).
TRAIN = ["model.vocab_size=384", "train.batch_size=8", "train.seq_len=32", "train.log_every=1",
         "train.save_every=2", "train.eval_batches=1", "optimizer.warmup_steps=1"]
METRICS = ["loss", "perplexity", "learning_rate", "grad_norm", "tokens_per_second",
           "step_time", "mfu", "moe/balance_loss", "moe/z_loss", "moe/dropped_fraction",
           "moe/bias_norm"]
# One list per record, one value per MoE layer (the small model: 2 MoE layers of 8 experts).
LAYER_METRICS = ["moe/load_max_over_mean", "moe/load_cv", "moe/dead_experts",
                 "moe/load_min_share", "moe/load_max_share", "moe/router_entropy"]


def train_py_args(workdir: pathlib.Path, *overrides: str) -> list[str]:
    """`python train.py` with the small test model and `overrides` ('a.b=value')."""
    flags = [f"--config.{o}" for o in [*SMALL_MODEL, *TRAIN, *overrides]]
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.py"),
            "--workdir", str(workdir), *flags]


# ---------------------------------------------------------------------------- loss masking

def test_targets_across_segment_boundaries_and_padding_are_excluded():
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 0, 0, 0], [3, 3, 3, 3, 3, 3, 4, 4]])
    expected = np.array([[1, 1, 0, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 1]], bool)
    np.testing.assert_array_equal(target_mask(segment_ids), expected)

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 11, size=(2, 8)).astype(np.int32)
    logits = rng.normal(size=(2, 8, 11)).astype(np.float32)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -sum(log_p[b, t, tokens[b, t + 1]] for b in range(2) for t in range(7)
                if expected[b, t])
    nll, count = shifted_nll(jnp.asarray(logits), jnp.asarray(tokens), segment_ids)
    assert int(count) == expected.sum()
    np.testing.assert_allclose(float(nll), want, rtol=1e-5)
    # Changing a padding token or a token of the next document's first position leaves it.
    tokens2 = tokens.copy()
    tokens2[0, 5:] = 7
    tokens2[0, 3] = (tokens[0, 3] + 1) % 11
    nll2, _ = shifted_nll(jnp.asarray(logits), jnp.asarray(tokens2), segment_ids)
    np.testing.assert_allclose(float(nll2), float(nll), rtol=1e-6)



def test_batch_loss_and_logged_loss_sum_the_same_terms():
    """The differentiated loss of a batch equals the logged `loss` of its statistics, and
    splitting the batch with whole-batch denominators sums to the same loss and stats."""
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 7, size=(4, 6)), jnp.int32)
    segment_ids = jnp.asarray([[1, 1, 1, 2, 2, 0]] * 2 + [[1, 1, 1, 1, 1, 1]] * 2, jnp.int32)
    aux = {"mtp_logits": jnp.asarray(rng.normal(size=(4, 6, 7)), jnp.float32),
           "moe_loss": jnp.float32(0.25), "mtp_moe_loss": jnp.float32(0.125),
           "indexer_loss": jnp.float32(0.5), "balance_loss": jnp.ones(2),
           "z_loss": jnp.ones(2), "dropped_fraction": jnp.zeros(2),
           "expert_load": jnp.full((2, 4), 0.25)}
    logits = jnp.asarray(rng.normal(size=(4, 6, 7)), jnp.float32)
    batch = {"tokens": tokens, "segment_ids": segment_ids}
    extra = ("indexer_loss",)
    loss, stats = batch_loss(logits, aux, batch, weight_mtp=0.3, extra_losses=extra)
    metrics = loss_metrics(stats, weight_mtp=0.3, extra_losses=extra)
    np.testing.assert_allclose(float(loss), float(metrics["loss"]), rtol=1e-6)
    ce, mtp_ce = stats["nll"] / stats["count"], stats["mtp_nll"] / stats["mtp_count"]
    np.testing.assert_allclose(float(loss), float(ce + 0.3 * mtp_ce + 0.375 + 0.5), rtol=1e-6)
    denoms = target_counts(segment_ids, with_mtp=True)
    halves = [batch_loss(logits[i::2], {k: v[i::2] if k == "mtp_logits" else v
                                         for k, v in aux.items()},
                         {k: v[i::2] for k, v in batch.items()}, 0.3, denoms, 0.5, extra)
              for i in range(2)]
    np.testing.assert_allclose(float(halves[0][0] + halves[1][0]), float(loss), rtol=1e-6)
    summed = jax.tree.map(jnp.add, halves[0][1], halves[1][1])
    np.testing.assert_allclose(float(loss_metrics(summed, 0.3, extra)["loss"]), float(loss),
                               rtol=1e-6)

# ------------------------------------------------------------------------------- optimizer

def test_weight_decay_mask_excludes_norms_biases_and_embeddings():
    cfg = small_config()
    model = moejax.Transformer(moejax.model_config(cfg.model))
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    mask = decay_mask(boxed["params"], decay_embeddings=False)
    assert mask["embed"]["embedding"] is False and mask["head"]["kernel"] is False
    assert mask["final_norm"]["scale"] is False
    moe = mask["moe_stack"]["layers"]
    assert moe["attention_norm"]["scale"] is False and moe["ffn_norm"]["scale"] is False
    assert moe["attention"]["query"] and moe["moe"]["up"] and moe["moe"]["router"]["kernel"]
    assert mask["dense_stack"]["layers"]["mlp"]["down"]
    with_embed = decay_mask(boxed["params"], decay_embeddings=True)
    assert with_embed["embed"]["embedding"] and with_embed["head"]["kernel"]
    assert not decays(("layers", "mlp"), 2, True)  # a bias inside a scanned stack
    assert decays(None, 2, False) and not decays(None, 1, False)


def test_warmup_cosine_schedule_values():
    opt = OptimizerConfig(learning_rate=1e-3, warmup_steps=10, end_lr_fraction=0.1)
    lr = learning_rate_schedule(opt, total_steps=110)
    cosine = lambda p: 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))  # noqa: E731
    for step, want in [(0, 0.0), (5, 5e-4), (10, 1e-3), (35, cosine(0.25)), (60, cosine(0.5)),
                       (110, 1e-4), (200, 1e-4)]:
        np.testing.assert_allclose(float(lr(step)), want, rtol=1e-5, atol=1e-9, err_msg=step)
    const = learning_rate_schedule(
        OptimizerConfig(learning_rate=1e-3, warmup_steps=10, decay="constant"), 110)
    assert [float(const(s)) for s in (0, 5, 10, 100)] == pytest.approx([0, 5e-4, 1e-3, 1e-3])


def _one_step(micro_batches: int, batch: dict) -> tuple[dict, dict]:
    cfg = resolve(small_config(*TRAIN, "model.num_layers=2", "model.moe.capacity_factor=0",
                               "optimizer.warmup_steps=0", f"train.micro_batches={micro_batches}"))
    mesh = moejax.make_mesh(moejax.MeshConfig(data=1), devices=jax.devices()[:1])
    with moejax.use_mesh(mesh):
        setup = make_setup(cfg, mesh)
        state = init_state(setup, jax.random.key(0))
        state, metrics = make_train_step(setup, cfg)(state, batch, jax.random.key(1))
    return jax.device_get(state.params), jax.device_get(metrics)


def test_gradient_accumulation_over_two_micro_batches_equals_one_batch():
    rng = np.random.default_rng(0)
    segment_ids = np.ones((8, 32), np.int32)
    segment_ids[:, 20:] = 2  # document boundaries, no padding (equal z-loss token counts)
    segment_ids[::3, 9:] += 1
    positions = np.zeros_like(segment_ids)
    batch = {"tokens": rng.integers(0, 256, size=(8, 32)).astype(np.int32),
             "segment_ids": segment_ids, "positions": positions}
    full_params, full = _one_step(1, batch)
    acc_params, acc = _one_step(2, batch)
    for name in ("loss", "cross_entropy", "grad_norm", "moe/balance_loss", "moe/z_loss"):
        np.testing.assert_allclose(acc[name], full[name], rtol=2e-5, err_msg=name)
    # atol: dropless sums each expert's weight gradient in a different order per split
    # (2e-6 seen on one of 4096 entries); a wrong accumulation is off by ~learning rate.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-6),
                 acc_params, full_params)


# ------------------------------------------------------------------------------- configs

def test_small_config_has_the_parameter_count_of_its_docstring():
    cfg = resolve(load_config(str(ROOT / "configs/small.py")))
    model = moejax.Transformer(cfg.model)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    assert sum(x.size for x in jax.tree.leaves(abstract["params"])) == 100_786_688
    assert cfg.model.dtype == "bfloat16" and cfg.model.param_dtype == "float32"


def test_dense_baseline_matches_tiny_active_flops_per_token():
    tiny = resolve(load_config(str(ROOT / "configs/tiny.py")))
    dense = resolve(load_config(str(ROOT / "configs/dense_baseline.py")))
    assert dense.model.num_dense_layers == dense.model.num_layers
    assert dense.model.embed_dim == tiny.model.embed_dim
    np.testing.assert_allclose(flops_per_token(dense.model, 256),
                               flops_per_token(tiny.model, 256), rtol=1e-3)


# ---------------------------------------------------------------------- entry point, inputs

# Constant decay: the same compiled train / held-out steps as test_checkpoint.py's runs
# (a hit in the shared compilation cache when they ran first).
CLI = ("train.steps=4", "optimizer.decay=constant")  # a command line: no quotes


def test_train_py_writes_config_metrics_tensorboard_and_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run(train_py_args(workdir, *CLI), env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["steps"] == 4 and config["model"]["embed_dim"] == 64
    assert '"steps": 4' in proc.stdout  # the resolved config is printed
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    for name in METRICS:
        assert all(math.isfinite(r[name]) for r in train_records), name
    for name in LAYER_METRICS:
        assert all(len(r[name]) == 2 and np.isfinite(r[name]).all() for r in train_records), name
    last = train_records[-1]
    assert 0 < min(last["moe/router_entropy"]) and max(last["moe/router_entropy"]) <= math.log(8)
    assert set(last["moe/dead_experts"]) <= set(range(9))
    assert last["moe/load_min_share"][0] <= 1 / 8 <= last["moe/load_max_share"][0]
    assert any("validation/bits_per_byte" in r for r in records)
    tags = {v.tag for e in read_events(workdir / "tensorboard") for v in e.summary.value}
    assert {"moe/expert_load", "moe/expert_load/layer_1", "moe/load_cv/layer_2"} <= tags
    assert (workdir / "checkpoints" / "4" / "state").is_dir()
    args = train_py_args(workdir, *CLI)
    args[1] = str(ROOT / "eval.py")
    proc = subprocess.run([*args, "--max_new_tokens=8", "--num_batches=2"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((workdir / "eval.json").read_text())
    assert {"step", "loss", "perplexity", "bits_per_byte", "gzip_bits_per_byte",
            "xz_bits_per_byte", "expert_load", "samples"} <= set(result)
    assert set(result["plots"]) == {"loss", "expert_load"}
    for path in result["plots"].values():
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n", path
    assert result["step"] == 4 and math.isfinite(result["bits_per_byte"])
    assert len(result["expert_load"]) == 2 and len(result["samples"]) == 2
    assert "bits per byte" in proc.stdout and "gzip -9" in proc.stdout


def test_unknown_command_line_field_is_an_error(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run(train_py_args(workdir, "train.nope=1"), env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "no field train.nope" in proc.stderr and "Traceback" not in proc.stderr
    assert not workdir.exists()


@pytest.mark.parametrize("path", ["", "missing/*.txt", "empty/*.txt"])
def test_missing_or_empty_data_path_is_an_error(tmp_path, path):
    (tmp_path / "empty").mkdir()
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="data.path"):
        glob = str(tmp_path / path) if path else ""
        train_and_evaluate(small_config(*TRAIN, "data.source='text'", f"data.path='{glob}'"),
                           workdir)
    assert not workdir.exists()


def test_corpus_too_small_for_one_batch_is_an_error(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i}.txt").write_text("x = 1\n")
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="0 full batches"):
        train_and_evaluate(small_config(*TRAIN, "data.source='text'",
                                        f"data.path='{tmp_path}/*.txt'"), workdir)
    assert not workdir.exists()


def test_vocab_smaller_than_tokenizer_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="model.vocab_size"):
        train_and_evaluate(small_config(*TRAIN, "model.vocab_size=128"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
