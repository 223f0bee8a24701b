"""Config loading, overrides and validation errors that name the field."""
import ml_collections
import pytest
from conftest import ROOT, small_config

import moejax
from moejax.config import resolve
from moejax.config.choices import ARCHITECTURES
from moejax.model.build import ARCHITECTURES as REGISTRY
from moejax.model.build import architecture_of

TINY = str(ROOT / "configs" / "tiny.py")

BAD = [
    ("model.moe.top_k=20", "model.moe.top_k"),
    ("model.num_kv_heads=3", "model.num_kv_heads"),
    ("model.moe.score_fn='relu'", "model.moe.score_fn"),
    ("model.moe.dispatch='magic'", "model.moe.dispatch"),
    ("model.moe.dropless_backend='gpu'", "model.moe.dropless_backend"),
    ("mesh.expert=3", "model.moe.num_experts"),
    ("mesh.tensor=4", "model.num_kv_heads"),
    ("model.num_dense_layers=9", "model.num_dense_layers"),
    ("model.rope.fraction=1.5", "model.rope.fraction"),
    ("model.moe.num_groups=3", "model.moe.num_groups"),
    ("model.remat_policy='some'", "model.remat_policy"),
    ("model.embed_dim=0", "model.embed_dim"),
    ("model.num_layers=2.5", "model.num_layers"),
    ("model.tie_embeddings=3", "model.tie_embeddings"),
]


@pytest.mark.parametrize("override,field", BAD)
def test_invalid_value_raises_value_error_naming_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        moejax.load_config(TINY, [override])


def test_unknown_field_is_rejected_with_the_known_ones():
    with pytest.raises(ValueError, match="no field model.nope"):
        moejax.load_config(TINY, ["model.nope=1"])


def test_overrides_apply_and_resolve_to_frozen_dataclasses():
    cfg = moejax.load_config(TINY, ["model.moe.num_experts=16", "model.moe.top_k=4"])
    resolved = resolve(cfg)
    assert resolved.model.moe.num_experts == 16 and resolved.model.moe.top_k == 4
    with pytest.raises(Exception):
        resolved.model.embed_dim = 3  # frozen


def test_unknown_key_in_a_config_file_section_is_rejected():
    cfg = small_config()
    cfg.model.unlocked = 1
    with pytest.raises(ValueError, match="unknown field"):
        resolve(cfg)


def test_missing_config_file_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        moejax.load_config("configs/nope.py")


def test_every_configurable_architecture_has_a_model_interface():
    assert set(ARCHITECTURES) == set(REGISTRY)
    with pytest.raises(ValueError, match="model.architecture"):
        architecture_of(ml_collections.ConfigDict({"architecture": "gpt2"}))
