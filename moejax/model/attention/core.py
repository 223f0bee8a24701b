"""Attention cores shared by every attention module: masks, the reference and the fast paths.

A query at position l attends to key s only if s <= l and both carry the same segment id,
so packed documents never see each other. `reference_attention` is the plain-einsum twin
used by the tests.

Implementations (`model.attention_impl`, config.ATTENTION_IMPLS): "einsum" computes in a
heads-major layout ([B, H, L, K], so every attention dot has its batch dims leading) with a
hand-written backward; on XLA:CPU its core takes ~0.5x the time of "xla" (bench/xla_cpu.py).
"xla" and "cudnn" call `jax.nn.dot_product_attention`; "reference" is the einsum twin in
[B, L, H, K]. "auto" is "einsum" on CPU, else "xla".
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

HEADS_MAJOR = ("act_batch", "act_heads", "act_length", None)  # logical axes of [B, H, L, K]


def resolve_impl(impl: str) -> str:
    """"auto" -> "einsum" on XLA:CPU (measured fastest there), "xla" on GPU/TPU."""
    if impl != "auto":
        return impl
    return "einsum" if jax.default_backend() == "cpu" else "xla"


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, L, L] boolean: causal and same segment."""
    length = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                        scale: float) -> jax.Array:
    """Softmax attention in fp32. q [B,L,H,K], k/v [B,S,Hkv,K], mask [B,1,L,S] -> [B,L,H,K]."""
    b, length, heads, dim = q.shape
    groups = heads // k.shape[2]
    qg = q.reshape(b, length, k.shape[2], groups, dim).astype(jnp.float32)
    logits = jnp.einsum("BLHGK,BSHK->BHGLS", qg, k.astype(jnp.float32)) * scale
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("BHGLS,BSHK->BLHGK", probs, v.astype(jnp.float32))
    return out.reshape(b, length, heads, dim).astype(q.dtype)


def causal_blocks_for(length: int) -> int:
    """Query blocks for causal self-attention: blocks of 64 rows or more, at most 4.

    Measured on XLA:CPU (fwd+bwd of the core, B 8, H 4, K 48; bench/xla_cpu.py has the
    L = 256 case): L = 256 with 1/2/4/8/16 blocks 1.00/0.83/0.76/0.67/1.01x; L = 512
    1.00/0.68/0.62/0.62/0.74x. 8 blocks would gain a little more at L = 256 but compile
    configs/tiny.py's step in ~24 s instead of ~16 s (1 block: ~13 s), so 4 is the cap.
    Fewer blocks are used when 4 does not divide L."""
    blocks = max(1, min(4, length // 64))
    while length % blocks:
        blocks -= 1
    return blocks


def heads_major_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          scale: float, causal_blocks: int = 1) -> jax.Array:
    """Softmax attention in fp32, heads before length: -> [B, H, L, J].

    q [B, H, L, K], k [B, Hkv, S, K], v [B, Hkv, S, J], mask [B, 1, L, S]. The H = Hkv * G
    query heads of a key/value head are folded into its length ([B, Hkv, G*L, K], a free
    reshape), so GQA never broadcasts k or v. The backward pass is written by hand
    (`_attend`): the softmax gradient uses rowsum(dO * O) over J instead of JAX's
    rowsum(dP * P) over the [.., L, S] scores, whose reduction XLA:CPU runs slowly, and
    the softmax's division by the row sums is applied to the [.., L, J] output instead.

    causal_blocks = n > 1 needs a causal mask and S == L: the queries are cut into n
    blocks and block i reads only the keys before its end, (i + 1) * L / n, so the blocks
    above the diagonal, (n - 1) / (2n) of the scores, are never computed.
    """
    length = q.shape[2]
    if causal_blocks <= 1 or length % causal_blocks or k.shape[2] != length:
        return _grouped_attend(q, k, v, mask, scale)
    size = length // causal_blocks
    outs = [_grouped_attend(q[:, :, start:start + size], k[:, :, :start + size],
                            v[:, :, :start + size],
                            mask[:, :, start:start + size, :start + size], scale)
            for start in range(0, length, size)]
    return jnp.concatenate(outs, axis=2)


def _grouped_attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                    scale: float) -> jax.Array:
    b, heads, length, _ = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(b, kv_heads, heads // kv_heads * length, q.shape[-1])
    out = _attend(grouped, k, v, mask, scale, heads // kv_heads)
    return out.reshape(b, heads, length, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
            groups: int) -> jax.Array:
    """q [B, Hkv, G*L, K], k [B, Hkv, S, K], v [B, Hkv, S, J], mask [B, 1, L, S]."""
    return _attend_fwd(q, k, v, mask, scale, groups)[0]


def _attend_fwd(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                groups: int) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Softmax with the normalisation deferred to the output: out = (E @ V) / l, E = exp(S -
    rowmax S), l = rowsum E, so the [.., L, S] divide of P = E / l is never done (the
    attention core fwd+bwd ~8 % faster on XLA:CPU, bench/README.md). Residual E, not P."""
    f32 = jnp.float32
    b, kv_heads, rows, _ = q.shape
    logits = jnp.einsum("BHLK,BHSK->BHLS", q.astype(f32), k.astype(f32)) * scale
    logits = logits.reshape(b, kv_heads, groups, rows // groups, -1)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(f32).min)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    e = e.reshape(b, kv_heads, rows, -1)
    inv_sum = 1.0 / jnp.sum(e, axis=-1, keepdims=True)  # [B, Hkv, G*L, 1]
    out = jnp.einsum("BHLS,BHSJ->BHLJ", e, v.astype(f32)) * inv_sum
    return out.astype(q.dtype), (q, k, v, e, inv_sum, out)


def _attend_bwd(scale: float, groups: int, res: tuple[jax.Array, ...], d_out: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array, None]:
    """With P = E / l: dV = P^T dO = E^T (dO / l); dS = P * (dO V^T - rowsum(dO * O))
    = E * ((dO / l) V^T - rowsum(dO * O) / l)."""
    del groups
    q, k, v, e, inv_sum, out = res
    f32 = jnp.float32
    d_out = d_out.astype(f32)
    row = jnp.sum(d_out * out, axis=-1, keepdims=True) * inv_sum  # rowsum(dP * P) / l
    d_scaled = d_out * inv_sum
    dv = jnp.einsum("BHLS,BHLJ->BHSJ", e, d_scaled)
    dp = jnp.einsum("BHLJ,BHSJ->BHLS", d_scaled, v.astype(f32))
    d_logits = e * (dp - row) * scale
    dq = jnp.einsum("BHLS,BHSK->BHLK", d_logits, k.astype(f32))
    dk = jnp.einsum("BHLS,BHLK->BHSK", d_logits, q.astype(f32))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          scale: float, impl: str) -> jax.Array:
    """Dispatches to the reference or to `jax.nn.dot_product_attention` (xla / cudnn).

    "einsum" lands here only for cached decoding ([B, L, H, K] cache): the reference."""
    if impl in ("reference", "einsum"):
        return reference_attention(q, k, v, mask, scale)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)
