"""TPU flash attention (`model.attention_impl = "splash"`): JAX's Pallas splash kernel.

Causal, segment-masked softmax attention that never builds the [B, H, L, S] logits: the
Pallas kernel walks (query block, key block) tiles, skips the fully masked ones and keeps a
running max / sum (Dao et al. 2022, FlashAttention). The XLA path ("xla",
`jax.nn.dot_product_attention`) materialises the logits: for DeepSeek-V3 at 6 x 8192 tokens
per chip and 128 heads that is 96 GiB per layer in bf16.

The kernel is a custom call that GSPMD cannot split, so it runs under `shard_map`: each
device takes its own rows (the `act_batch` axes) and heads (`act_heads`), and `jax.vmap`
maps the per-sequence kernel over the local rows. The value head dim may differ from the
query/key one (MLA: 192 vs 128). TPU only; `interpret=True` runs the same kernel through
the Pallas interpreter on any backend (what the CPU tests compare with the reference).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec

from moejax.sharding import _ACTIVE, logical_to_spec

BLOCK = 512  # query / key tile (TPU lanes: a multiple of 128)
SPLASH_MULTIPLE = 128  # sequence lengths the kernel takes


def _block_sizes(length: int) -> splash.BlockSizes:
    b = min(BLOCK, length)
    return splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                             block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b,
                             block_kv_dq=b)


def _local_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     interpret: bool) -> jax.Array:
    """One device's rows: q/k [B, H, L, K] (already scaled), v [B, H, L, J] -> [B, H, L, J]."""
    heads, length = q.shape[1], q.shape[2]
    mask = masks.MultiHeadMask([masks.CausalMask((length, length))] * heads)
    kernel = splash.make_splash_mha(mask, block_sizes=_block_sizes(length), head_shards=1,
                                    q_seq_shards=1, interpret=interpret)
    one = lambda q_, k_, v_, s_: kernel(q_, k_, v_,  # noqa: E731
                                        segment_ids=splash.SegmentIds(q=s_, kv=s_))
    return jax.vmap(one)(q, k, v, segment_ids)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     scale: float, interpret: bool = False) -> jax.Array:
    """Causal same-segment attention, heads-major: q/k [B, H, L, K], v [B, H, L, J],
    segment_ids int [B, L] -> [B, H, L, J] in q's dtype. L must be a multiple of 128."""
    q = (q * scale).astype(q.dtype)
    segment_ids = segment_ids.astype(jnp.int32)
    fn = functools.partial(_local_attention, interpret=interpret)
    active = _ACTIVE.get()
    if active is None:
        return fn(q, k, v, segment_ids)
    mesh, rules = active
    spec = logical_to_spec(("act_batch", "act_heads"), rules, q.shape[:2], mesh)
    heads4 = PartitionSpec(spec[0], spec[1], None, None)
    rows = PartitionSpec(spec[0], None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(heads4, heads4, heads4, rows),
                         out_specs=heads4, check_vma=False)(q, k, v, segment_ids)
