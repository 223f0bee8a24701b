"""Training signal of the lightning indexer: KL distillation from the main attention.

The indexer's top-k selection is not differentiable, so the language-model loss gives its
weights no gradient. DeepSeek-V3.2's DSA (whose indexer V4's CSA indexer follows) trains
it with a separate term; per query t, over a candidate set S_t of compressed entries:

    p_t = sum_h A_h[t, S_t] / || sum_h A_h[t, S_t] ||_1    main attention probabilities
          (each head's softmax over window keys + entries + sink, the entry columns summed
          over heads, L1-normalised over S_t), under stop_gradient
    q_t = softmax(I[t, S_t])                              the indexer scores, same set
    loss = mean over real queries t with S_t non-empty of KL(p_t || q_t)

S_t is the selected top-k (DSA's sparse stage, the default) or every visible entry (DSA's
dense warm-up, `attention.indexer_warmup`, where the main attention of the training forward
also sees them all; decoding and HF always use the top-k). DSA also freezes the rest of the
model during its warm-up; that is an optimizer setting, not done here.
The indexer runs on stop_gradient'ed inputs (`V4Attention`), and p is stop_gradient'ed
here, so this term trains only the indexer and the language-model gradients of every
other weight stay as they are. `attention.indexer_loss_coef` weights it in the loss
(0 = off: not computed at all).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def indexer_kl(attention: jax.Array, scores: jax.Array, candidates: jax.Array,
               real: jax.Array) -> jax.Array:
    """Mean KL(p || q) over the rows that have a candidate; fp32 scalar.

    attention [B, L, T]: main-attention probabilities of the entries summed over heads
    (any non-negative weights; renormalised over the candidates); scores [B, L, T]: indexer
    scores I[t, w]; candidates [B, L, T] bool: S_t; real [B, L] bool: non-padding queries.
    """
    p = jnp.where(candidates, jax.lax.stop_gradient(attention).astype(jnp.float32), 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    masked = jnp.where(candidates, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    log_q = jax.nn.log_softmax(masked, axis=-1)
    log_p = jnp.log(jnp.where(p > 0, p, 1.0))
    kl = jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)  # [B, L]
    rows = real & candidates.any(-1)
    return jnp.sum(jnp.where(rows, kl, 0.0)) / jnp.maximum(rows.sum(), 1).astype(jnp.float32)
