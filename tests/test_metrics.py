"""moejax.train.metrics: the FLOPs-per-token formula against the shape-counting planner."""
import pytest
from conftest import ROOT

from moejax.config import load_config, model_config
from moejax.plan import plan
from moejax.train import flops_per_token


@pytest.mark.parametrize("config", ["deepseek_v3.py", "tiny.py"])
def test_flops_per_token_matches_the_planner(config: str):
    """MLA counts QK^T over nope + rope dims and AV over v_head_dim (not model.head_dim)."""
    cfg = load_config(str(ROOT / "configs" / config))
    want = plan(cfg, 64)["flops_per_token"]
    assert flops_per_token(model_config(cfg.model), 64) == pytest.approx(want, rel=1e-9)
