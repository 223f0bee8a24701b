"""moejax.plan --mesh / moejax.plan_memory: per-device state from the sharded abstract state,
TPU layout padding, activations per remat policy, the largest batch that fits."""
import json

import pytest
from conftest import ROOT

from moejax.config import load_config_file
from moejax.plan import KEYS, main
from moejax.plan_memory import (abstract_setup, activation_bytes, memory_plan, parse_mesh,
                                state_bytes, tpu_tiled_bytes)

TINY = str(ROOT / "configs/tiny.py")


@pytest.mark.parametrize("shape, itemsize, want", [
    # shapes and sizes of configs/tiny.py's train-state arguments as XLA:TPU laid them out
    ((5, 32, 4, 32), 4, 327680),  # T(4,128): 32 -> 128 lanes, 4 rows
    ((5, 32, 2, 32), 4, 163840),  # T(2,128)
    ((5, 96, 32), 4, 81920),  # the 96-wide dim goes minor: 96 -> 128
    ((5, 8, 32, 96), 4, 655360),
    ((1, 128), 4, 512),  # T(1,128)
    ((128,), 4, 512),
    ((4096, 1024), 2, 4096 * 1024 * 2),  # aligned: no padding
])
def test_tpu_layout_padding(shape, itemsize, want):
    assert tpu_tiled_bytes(shape, itemsize) == want


def test_state_shrinks_with_fsdp_and_adam_holds_two_moments_per_parameter():
    config = load_config_file(TINY)
    whole = state_bytes(abstract_setup(config, parse_mesh("data=4"))[1], tiled=False)
    split = state_bytes(abstract_setup(config, parse_mesh("fsdp=4"))[1], tiled=False)
    for state in (whole, split):
        assert state["optimizer"] == pytest.approx(2 * state["params"], abs=64)  # + counts
        assert state["gradients"] == state["params"]  # fp32 parameters
    # everything but the norm scales and the router is split four ways
    assert whole["params"] / 4 < split["params"] < whole["params"] / 3


def test_activations_order_by_remat_policy_and_grow_with_rows():
    config = load_config_file(TINY)
    cfg, setup = abstract_setup(config, parse_mesh("data=1"))
    one = {p: activation_bytes(cfg, setup, p, 1) for p in ("none", "full", "save_moe")}
    assert 0 < one["full"] < one["save_moe"] < one["none"]
    assert activation_bytes(cfg, setup, "full", 2) == pytest.approx(2 * one["full"], rel=0.02)


@pytest.mark.slow  # the CLI traces every remat policy; memory_plan's parts are tested above
def test_plan_cli_adds_memory_with_a_mesh_and_a_chip(capsys):
    assert main(["--config", TINY, "--mesh", "fsdp=4", "--chip", "v5p", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert tuple(out)[:len(KEYS)] == KEYS
    memory = out["memory"]
    assert memory["devices"] == 4 and memory["fits"]
    assert memory["total_bytes"] == (memory["state_bytes"] + memory["gradient_bytes"]
                                     + memory["layer_working_bytes"]
                                     + memory["layer_backward_bytes"]
                                     + memory["activation_bytes"][memory["remat_policy"]])
    assert 0 < memory["layer_working_bytes"] < memory["state_bytes"]
    assert memory["max_batch_size"] >= load_config_file(TINY).train.batch_size


@pytest.mark.parametrize("text", ["fsdp=0", "pipeline=2", "fsdp"])
def test_bad_mesh_is_an_error(text):
    with pytest.raises(ValueError, match="--mesh"):
        parse_mesh(text)


def test_unknown_chip_is_an_error():
    with pytest.raises(ValueError, match="--chip"):
        memory_plan(load_config_file(TINY), parse_mesh("fsdp=1"), "v9")


def test_cost_of_a_run_is_the_hand_computation():
    """1e9 FLOPs per token x 1e12 tokens on 256 v5p chips (459e12 bf16 FLOP/s) at 30 % MFU:
    1e21 / (256 x 459e12 x 0.3) = 28,368.0 s = 0.32833 days; 256 x 28,368.0 / 3600 =
    2,017.28 chip-hours; 1e12 / 2,017.28 = 495,717,192 tokens per chip-hour."""
    from moejax.plan_cost import run_cost
    cost = run_cost(1e9, 1e12, 256, "v5p", 0.3)
    assert cost["training_flops"] == 1e21
    assert cost["seconds"] == pytest.approx(28368.0, rel=1e-5)
    assert cost["days"] == pytest.approx(0.32833, rel=1e-4)
    assert cost["chip_hours"] == pytest.approx(2017.28, rel=1e-5)
    assert cost["tokens_per_chip_hour"] == pytest.approx(495_717_192, rel=1e-5)


def test_plan_cli_cost_for_several_mfus_and_its_errors(capsys):
    args = ["--config", TINY, "--tokens", "1e9", "--chips", "8", "--chip", "v5e", "--json"]
    assert main([*args, "--mfu", "0.25,0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    fast, slow = out["cost"]["runs"][1], out["cost"]["runs"][0]
    assert out["cost"]["mfu_is_assumed"] and "memory" not in out
    assert fast["training_flops"] == pytest.approx(out["flops_per_token"] * 1e9)
    assert slow["seconds"] == pytest.approx(2 * fast["seconds"])
    assert main([*args, "--mfu", "1.5"]) == 2 and "--mfu" in capsys.readouterr().err
    assert main(args[:4] + ["--mfu", "0.3"]) == 2 and "--chips" in capsys.readouterr().err


def test_layer_backward_is_the_recomputed_residuals_and_their_cotangents_of_one_layer():
    """(none - policy) / L recomputed + none / L cotangents; nothing recomputed under "none"."""
    from moejax.plan_memory import layer_backward_bytes
    activations = {"none": 400, "full": 40}
    assert layer_backward_bytes(activations, "full", 4) == (400 - 40) // 4 + 400 // 4
    assert layer_backward_bytes(activations, "none", 4) == 400 // 4
