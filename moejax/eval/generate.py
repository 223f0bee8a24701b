"""Autoregressive sampling with the KV cache: greedy, temperature and nucleus (top-p).

The prompt is run once (prefill) to fill the cache, then one jitted `lax.scan` produces the
new tokens. Routing never drops tokens here: the MoE runs with unlimited capacity, since a
decode step's few tokens would otherwise compete for per-group capacity.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import AnyModelConfig
from moejax.model.build import build_model, drop_free


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float
                  ) -> jax.Array:
    """[B, V] -> [B] token ids; temperature 0 is greedy; top_p < 1 keeps the nucleus."""
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        kept = jnp.where(before < top_p, sorted_logits, jnp.inf).min(-1, keepdims=True)
        logits = jnp.where(logits < kept, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def decoding_model(cfg: AnyModelConfig) -> nn.Module:
    """The same architecture in decode mode, with drop-free routing."""
    return build_model(drop_free(cfg), decode=True)


def generate(cfg: AnyModelConfig, variables: Any, prompt: np.ndarray, num_samples: int,
             max_new_tokens: int, rng: jax.Array, temperature: float = 1.0,
             top_p: float = 1.0) -> np.ndarray:
    """Returns [num_samples, len(prompt) + max_new_tokens] token ids (prompt included)."""
    prompt = np.asarray(prompt, np.int32)
    total = prompt.shape[0] + max_new_tokens
    if prompt.shape[0] == 0:
        raise ValueError("generate: the prompt is empty; give at least one token.")
    if total > cfg.max_seq_len:
        raise ValueError(f"generate: prompt ({prompt.shape[0]}) + max_new_tokens "
                         f"({max_new_tokens}) exceeds model.max_seq_len={cfg.max_seq_len}.")
    model = decoding_model(cfg)
    weights = {k: v for k, v in variables.items() if k != "cache"}
    tokens = jnp.broadcast_to(jnp.asarray(prompt), (num_samples, prompt.shape[0]))
    new = _generate(model, weights, tokens, rng, max_new_tokens, temperature, top_p)
    return np.concatenate([np.asarray(tokens), np.asarray(new)], axis=1)


def _generate(model: nn.Module, weights: Any, tokens: jax.Array, rng: jax.Array,
              steps: int, temperature: float, top_p: float) -> jax.Array:
    @jax.jit
    def run(weights: Any, tokens: jax.Array, rng: jax.Array) -> jax.Array:
        b, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length), (b, length))
        (logits, _), cache = model.apply(weights, tokens, positions=positions,
                                         mutable=["cache"])

        def step(carry: Any, key: jax.Array) -> tuple[Any, jax.Array]:
            cache, last_logits, pos = carry
            token = sample_logits(last_logits, key, temperature, top_p)
            (logits, _), cache = model.apply(
                {**weights, **cache}, token[:, None],
                positions=jnp.full((b, 1), pos), mutable=["cache"])
            return (cache, logits[:, -1], pos + 1), token

        keys = jax.random.split(rng, steps)
        _, new = jax.lax.scan(step, (cache, logits[:, -1], jnp.int32(length)), keys)
        return new.T

    return run(weights, tokens, rng)
