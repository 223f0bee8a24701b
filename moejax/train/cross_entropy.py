"""Cross-entropy of an LM head without the [B, L, V] fp32 logits: sequence tiles, custom VJP.

    nll_sum = sum_{b,t} weights[b,t] * (logsumexp_v(h[b,t] @ w)[v] - (h[b,t] @ w)[targets[b,t]])

`chunked_cross_entropy` computes it over tiles of `chunk` positions with `lax.scan`: each
tile's logits [B, chunk, V] (fp32 accumulation) live only inside one loop step. The
forward keeps the per-token logsumexp [B, L] (fp32) as the only residual besides its inputs;
the backward recomputes each tile's logits, forms softmax - onehot in place and
accumulates dW [D, V] in fp32 in the loop carry, constrained to the LM head's own layout
(logical ("embed", "vocab")), so the weight gradient never exists whole on a device.
Memory: O(B_local x chunk x V) instead of O(B_local x L x V) for the forward *and* the
backward; FLOPs: one more logits matmul than the plain version (the recompute).

`reference_cross_entropy` is the plain twin (whole logits, optax), for tests and small runs.
At DeepSeek sizes (V = 129,280) the plain fp32 logits are B_local x L x 0.5 MB: 25 GiB per
chip at 6 x 8192 tokens, twice with the MTP head, plus their gradients.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from moejax.sharding import constrain


def reference_cross_entropy(h: jax.Array, w: jax.Array, targets: jax.Array,
                            weights: jax.Array) -> jax.Array:
    """Plain twin: h [B, L, D], w [D, V], targets int [B, L], weights [B, L] -> fp32 sum."""
    logits = jnp.einsum("bld,dv->blv", h, w, preferred_element_type=jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(weights.astype(jnp.float32) * nll)


def tile_size(length: int, chunk: int) -> int:
    """The largest divisor of `length` that is <= chunk (chunk <= 0: the whole length)."""
    if chunk <= 0 or chunk >= length:
        return length
    return max(d for d in range(1, chunk + 1) if length % d == 0)


def _tiles(x: jax.Array, chunk: int) -> jax.Array:
    """[B, L, ...] -> [L / chunk, B, chunk, ...] (the scan axis first)."""
    b, length = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, length // chunk, chunk, *x.shape[2:]), 1, 0)


def _tile_logits(h: jax.Array, w: jax.Array) -> jax.Array:
    logits = jnp.einsum("bld,dv->blv", h, w, preferred_element_type=jnp.float32)
    return constrain(logits, ("act_batch", "act_length", "act_vocab"))


def _forward(h: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array,
             chunk: int) -> tuple[jax.Array, jax.Array]:
    """(weighted nll sum, logsumexp tiles [L / chunk, B, chunk])."""
    def body(total: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        h_c, t_c, w_c = xs
        logits = _tile_logits(h_c, w)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        return total + jnp.sum(w_c * (lse - target)), lse

    xs = (_tiles(h, chunk), _tiles(targets, chunk), _tiles(weights.astype(jnp.float32), chunk))
    return jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def chunked_cross_entropy(h: jax.Array, w: jax.Array, targets: jax.Array,
                          weights: jax.Array, chunk: int) -> jax.Array:
    """Weighted next-token NLL sum (fp32) over sequence tiles; see the module docstring.

    h [B, L, D] (compute dtype), w [D, V], targets int [B, L], weights [B, L] (0 where a
    position is not a target). `chunk` must divide L (see `tile_size`). Gradients flow to
    h and w only.
    """
    return _forward(h, w, targets, weights, chunk)[0]


def _fwd(h: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array, chunk: int
         ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    total, lse = _forward(h, w, targets, weights, chunk)
    return total, (h, w, targets, weights, lse)


def _bwd(chunk: int, res: tuple[jax.Array, ...], g: jax.Array
         ) -> tuple[jax.Array, jax.Array, None, None]:
    h, w, targets, weights, lse = res
    scale = _tiles(weights.astype(jnp.float32), chunk) * g

    def body(dw: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        h_c, t_c, lse_c, s_c = xs
        logits = _tile_logits(h_c, w)
        probs = jnp.exp(logits - lse_c[..., None])
        onehot = jax.nn.one_hot(t_c, logits.shape[-1], dtype=jnp.float32)
        g_logits = ((probs - onehot) * s_c[..., None]).astype(h.dtype)
        dh_c = jnp.einsum("blv,dv->bld", g_logits, w, preferred_element_type=jnp.float32)
        dw = dw + jnp.einsum("bld,blv->dv", h_c, g_logits, preferred_element_type=jnp.float32)
        return constrain(dw, ("embed", "vocab")), dh_c.astype(h.dtype)

    dw0 = constrain(jnp.zeros(w.shape, jnp.float32), ("embed", "vocab"))
    dw, dh = jax.lax.scan(body, dw0, (_tiles(h, chunk), _tiles(targets, chunk), lse, scale))
    dh = jnp.moveaxis(dh, 0, 1).reshape(h.shape)
    return dh, dw.astype(w.dtype), None, None


chunked_cross_entropy.defvjp(_fwd, _bwd)


def head_weight(params: dict, tied: bool, dtype: jnp.dtype) -> jax.Array:
    """The LM head as [D, V] in the compute dtype: `head/kernel`, or the tied embedding^T."""
    w = params["embed"]["embedding"].T if tied else params["head"]["kernel"]
    return w.astype(dtype)


def shifted_token_nll(h: jax.Array, w: jax.Array, tokens: jax.Array, mask: jax.Array,
                      shift: int, chunk: int) -> tuple[jax.Array, jax.Array]:
    """(summed NLL of token t+shift predicted from h[:, t], number of counted targets).

    mask bool [B, L - shift]: which predictions count (`loss.target_mask(segment_ids, shift)`).
    The last `shift` positions have no target (weight 0).
    """
    b, length = tokens.shape
    pad = jnp.zeros((b, shift), tokens.dtype)
    targets = jnp.concatenate([tokens[:, shift:], pad], axis=1)
    weights = jnp.concatenate([mask, jnp.zeros((b, shift), bool)], 1).astype(jnp.float32)
    nll = chunked_cross_entropy(h, w, targets, weights, tile_size(length, chunk))
    return nll, jnp.sum(mask).astype(jnp.float32)
