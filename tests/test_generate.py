"""Sampling: greedy decoding equals argmax of the full forward; nucleus filtering."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config

import moejax
from moejax.eval.generate import generate, sample_logits


def test_greedy_generation_matches_full_forward_argmax():
    cfg = moejax.model_config(small_config().model)
    model = moejax.Transformer(cfg)
    prompt = np.asarray([5, 17, 3, 99, 42], np.int32)
    variables = jax.jit(lambda k, t: nn.unbox(model.init(k, t)))(  # one program, not op by op
        jax.random.key(0), jnp.asarray(prompt)[None])
    out = generate(cfg, variables, prompt, 2, 6, jax.random.key(1), temperature=0.0)
    assert out.shape == (2, 11)
    np.testing.assert_array_equal(out[:, :5], np.stack([prompt] * 2))
    drop_free = moejax.Transformer(moejax.model_config(
        small_config("model.moe.capacity_factor=0.0").model))
    logits, _ = jax.jit(drop_free.apply)(variables, jnp.asarray(out[:1]))
    # Causal model: the logits at t-1 of the whole sequence are those of the prefix, so
    # each new token must be their argmax.
    np.testing.assert_array_equal(np.argmax(logits[0, 4:10], axis=-1), out[0, 5:11])


def test_top_p_keeps_only_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sample_logits(logits, k, 1.0, 0.7)[0]))(
        keys[:200]))  # 200 independent draws
    assert set(draws) == {0, 1}  # 0.5 + 0.3 covers 0.7; 2 and 3 are cut
    greedy = sample_logits(logits, keys[0], 0.0, 1.0)
    assert int(greedy[0]) == 0


def test_generation_longer_than_the_model_is_refused():
    cfg = moejax.model_config(small_config().model)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(cfg, {}, np.zeros(10, np.int32), 1, cfg.max_seq_len, jax.random.key(0))
