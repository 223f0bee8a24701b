"""moejax.train.metrics: the FLOPs-per-token formula against the shape-counting planner; the
per-layer MoE statistics by hand; the writer's metrics.jsonl and TensorBoard records."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, read_events

from moejax.config import load_config, model_config
from moejax.model.moe.router import router_entropy
from moejax.plan import plan
from moejax.train import MetricsWriter, flops_per_token, loss_metrics
from moejax.train.expert_load import (cell_pixels, dead_threshold, load_cv, load_picture,
                                      load_summary)
from moejax.train.metrics import host_metrics


@pytest.mark.parametrize("config", ["deepseek_v3.py", "tiny.py"])
def test_flops_per_token_matches_the_planner(config: str):
    """MLA counts QK^T over nope + rope dims and AV over v_head_dim (not model.head_dim)."""
    cfg = load_config(str(ROOT / "configs" / config))
    want = plan(cfg, 64)["flops_per_token"]
    assert flops_per_token(model_config(cfg.model), 64) == pytest.approx(want, rel=1e-9)


# ------------------------------------------------------------------ MoE load and router

# E = 4: uniform share 0.25, dead below 1/(10 E) = 0.025.
LOAD = np.array([[0.5, 0.3, 0.2, 0.0],
                 [0.25, 0.25, 0.25, 0.25],
                 [0.02, 0.03, 0.45, 0.5]])


@pytest.mark.parametrize("xp", [np, jnp])
def test_load_statistics_by_hand(xp):
    """CV (population std / mean), dead count at 1/(10 E), min and max share, per layer."""
    stats = load_summary(xp.asarray(LOAD))
    # layer 0: deviations from 0.25 are .25, .05, .05, .25 -> std = sqrt(0.13 / 4)
    # layer 2: deviations .23, .22, .2, .25 -> std = sqrt(0.2038 / 4)
    want_cv = [math.sqrt(0.13 / 4) / 0.25, 0.0, math.sqrt(0.2038 / 4) / 0.25]
    np.testing.assert_allclose(stats["load_cv"], want_cv, rtol=1e-6)
    np.testing.assert_array_equal(stats["dead_experts"], [1, 0, 1])  # 0.0 and 0.02; not 0.03
    np.testing.assert_allclose(stats["load_min_share"], [0.0, 0.25, 0.02])
    np.testing.assert_allclose(stats["load_max_share"], [0.5, 0.25, 0.5])
    assert dead_threshold(4) == 0.025
    # every token on the same T = 2 of E = 4 experts: sqrt(E / T - 1) = 1
    np.testing.assert_allclose(load_cv(xp.asarray([0.5, 0.5, 0.0, 0.0])), 1.0, rtol=1e-6)


def test_router_entropy_of_known_distributions():
    """Normalised scores [2, 1, 1, 0] -> p = [1/2, 1/4, 1/4, 0]: H = 1.5 ln 2; equal sigmoid
    scores: ln 4; a padding token (mask 0) with other scores does not count."""
    scores = jnp.array([[[2.0, 1.0, 1.0, 0.0], [0.7, 0.7, 0.7, 0.7], [9.0, 0.0, 0.0, 0.0]]])
    mask = jnp.array([[1, 1, 0]])
    want = (1.5 * math.log(2) + math.log(4)) / 2
    np.testing.assert_allclose(float(router_entropy(scores, mask)), want, rtol=1e-6)


def test_loss_metrics_carry_the_per_layer_moe_statistics():
    stats = {"nll": jnp.float32(6.0), "count": jnp.float32(3.0), "moe_loss": jnp.float32(0.0),
             "balance_loss": jnp.ones(3), "z_loss": jnp.ones(3), "dropped_fraction": jnp.zeros(3),
             "expert_load": jnp.asarray(LOAD), "router_entropy": jnp.array([1.0, 1.2, 0.5])}
    m = loss_metrics(stats, weight_mtp=0.0)
    np.testing.assert_array_equal(m["moe/dead_experts"], [1, 0, 1])
    np.testing.assert_allclose(m["moe/router_entropy"], [1.0, 1.2, 0.5])
    np.testing.assert_allclose(m["moe/expert_load"], LOAD)
    host = host_metrics(jax.device_get(m))
    assert host["moe/load_max_share"] == pytest.approx([0.5, 0.25, 0.5])
    assert "moe/expert_load" not in host and isinstance(host["loss"], float)


def test_writer_puts_lists_in_jsonl_and_load_images_in_tensorboard(tmp_path):
    """Per-layer lists in metrics.jsonl, scalars per decoder layer in TensorBoard; the load
    image and histograms at multiples of load_every, the first call, and the last on close."""
    writer = MetricsWriter(tmp_path, first_moe_layer=1, load_every=10)
    for step in (1, 5, 10, 15):
        writer.write(step, {"loss": 2.0, "moe/dead_experts": [1.0, 0.0, 1.0]})
        writer.write_expert_load(step, LOAD * (step / 15))
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().split("\n")
               if line]
    assert records[0] == {"step": 1, "loss": 2.0, "moe/dead_experts": [1.0, 0.0, 1.0]}
    values = [(e.step, v) for e in read_events(tmp_path / "tensorboard") for v in e.summary.value]
    tags = {v.tag for _, v in values}
    assert {"loss", "moe/dead_experts/layer_1", "moe/dead_experts/layer_3",
            "moe/expert_load/layer_1", "moe/expert_load/layer_3"} <= tags
    images = [(step, v.image) for step, v in values if v.tag == "moe/expert_load"]
    assert [step for step, _ in images] == [1, 10, 15]
    assert images[0][1].encoded_image_string.startswith(b"\x89PNG")
    assert (images[0][1].height, images[0][1].width) == load_picture(LOAD).shape[:2]


def test_load_picture_cells_and_dead_experts():
    picture = load_picture(LOAD)
    dy, dx = cell_pixels(*LOAD.shape)
    assert picture.shape == (3 * dy, 4 * dx, 3) and picture.dtype == np.uint8
    np.testing.assert_array_equal(picture[0, 3 * dx], [255, 0, 0])  # layer 0 expert 3: dead
    assert (picture[2 * dy, 1 * dx] != [255, 0, 0]).any()  # share 0.03 >= 0.025: alive
    assert (picture[dy:2 * dy] == [33, 145, 140]).all()  # uniform: the ramp's middle colour
