"""DeepSeek-V4 decoder: mHC residual streams around V4 attention and V4 MoE, plus MTP.

    X = repeat(embed(tokens), n)                              [B, L, n, D]
    per layer l:  (post, comb, y) = attn_hc(X);  X = post * attention_l(attn_norm(y)) + comb^T X
                  (post, comb, y) = ffn_hc(X);   X = post * moe_l(ffn_norm(y), tokens)   + comb^T X
    logits = head(final_norm(hc_head(X)))

`TransformerV4` has `moejax.Transformer`'s call contract:
`logits, aux = model.apply(variables, tokens, segment_ids=None, positions=None)` with aux
`balance_loss`, `z_loss`, `dropped_fraction` [L], `expert_load` [L, E], `moe_loss`,
`indexer_kl` [L] (each CSA layer's lightning-indexer KL, 0 elsewhere or when off) and
`indexer_loss` = attention.indexer_loss_coef * its sum (+ the MTP block's); the
balance biases are `moe_bias/bias` [L, E] (every V4 layer is MoE; the rows of hash layers
are unused) and the hash tables `hash_routing/.../tid2eid`. With `mtp.depth = 1` and
`with_mtp=True`, aux also holds `mtp_logits` [B, L, V] (position t predicts t+2),
`mtp_expert_load` [1, E], `mtp_moe_loss`; the MTP bias is `moe_bias/mtp_bias` [1, E].

Layer stacking: layers differ by attention type and hash routing, so with
`scan_layers=True` the schedule is cut into runs of a repeated unit of 1 or 2 layer kinds
(`layer_segments`); each run is one `nn.scan` (V4-Flash: 2 SWA-hash layers, 1 CSA-hash
layer, 20 x (HCA, CSA)), the rest unrolled. `scan_layers=False` unrolls every layer
(`layers_{l}`), which is what the tiny configs use.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from moejax.model.v4.hyper import HyperConnection, HyperHead, expand, expand_streams
from moejax.model.layers import Embed, LMHead, RMSNorm, linear, normal_init
from moejax.model.mtp import MTP_BIAS, mtp_aux, next_tokens
from moejax.model.moe.router import balance_bias, weighted_moe_loss
from moejax.model.remat import rematerialised
from moejax.model.v4.attention import V4Attention
from moejax.config.v4 import V4Config
from moejax.model.v4.moe import HASH_COLLECTION, V4MoE

@dataclasses.dataclass(frozen=True)
class Segment:
    """`repeats` consecutive copies of a unit of `len(kinds)` layers starting at `start`."""
    start: int
    kinds: tuple[tuple[str, bool], ...]  # (layer_type, is_hash) of each layer of the unit
    repeats: int
    scanned: bool

    @property
    def name(self) -> str:
        return f"stack_{self.start}" if self.scanned else f"layers_{self.start}"

    @property
    def num_layers(self) -> int:
        return len(self.kinds) * self.repeats


def layer_kinds(cfg: V4Config) -> list[tuple[str, bool]]:
    return [(cfg.layer_type(i), cfg.is_hash(i)) for i in range(cfg.num_layers)]


def layer_segments(cfg: V4Config) -> list[Segment]:
    """Greedy cut of the schedule into scanned runs (unit of 1 or 2 kinds) and single layers."""
    kinds = layer_kinds(cfg)
    out, i = [], 0
    while i < len(kinds):
        best = (1, 1)  # (period, repeats)
        for period in (1, 2) if cfg.scan_layers else ():
            unit = kinds[i:i + period]
            reps = 0
            while kinds[i + reps * period:i + (reps + 1) * period] == unit and len(unit) == period:
                reps += 1
            if reps >= 2 and period * reps > best[0] * best[1]:
                best = (period, reps)
        period, reps = best
        out.append(Segment(i, tuple(kinds[i:i + period]), reps, reps >= 2))
        i += period * reps
    return out


def layer_location(cfg: V4Config, layer: int) -> tuple[tuple[str, ...], int | None]:
    """Path of layer `layer`'s block inside a collection, and its scan index (or None)."""
    for seg in layer_segments(cfg):
        if seg.start <= layer < seg.start + seg.num_layers:
            if not seg.scanned:
                return (seg.name,), None
            rep, j = divmod(layer - seg.start, len(seg.kinds))
            return (seg.name, f"block_{j}"), rep
    raise IndexError(f"layer {layer} is outside the {cfg.num_layers}-layer model.")


def relayout(variables: Any, src: V4Config, dst: V4Config) -> Any:
    """Moves every layer's variables from `src`'s layout to `dst`'s (scanned <-> unrolled).

    The configs may differ only in `scan_layers` (or anything else that keeps the layer
    schedule and shapes). Returns numpy arrays.
    """
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    target = nn.unbox(jax.eval_shape(TransformerV4(dst).init, jax.random.key(0), tokens))
    out = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), target)
    for name, tree in variables.items():
        for key, value in tree.items():
            if key != "layers":
                out[name][key] = jax.tree.map(np.asarray, value)
                continue
            for layer in range(src.num_layers):
                (s_path, s_rep), (d_path, d_rep) = (layer_location(src, layer),
                                                    layer_location(dst, layer))
                s_node, d_node = value, out[name]["layers"]
                if s_path[0] not in s_node:  # e.g. no hash table in a learned layer
                    continue
                for k in s_path:
                    s_node = s_node[k]
                for k in d_path:
                    d_node = d_node[k]

                def put(d: np.ndarray, s: Any) -> None:
                    s = np.asarray(s if s_rep is None else s[s_rep])
                    if d_rep is None:
                        d[...] = s
                    else:
                        d[d_rep] = s
                jax.tree.map(put, d_node, s_node)
    return out


class V4Block(nn.Module):
    """One V4 layer on the streams X [B, L, n, D]; returns (X, MoE stats)."""
    cfg: V4Config
    layer_type: str
    is_hash: bool
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, tokens: jax.Array,
                 segment_ids: jax.Array, positions: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        hc = lambda name: HyperConnection(cfg.hc.hc_mult, cfg.hc.sinkhorn_iters,  # noqa: E731
                                          cfg.hc.eps, cfg.norm_eps, cfg.init_std, name=name)
        norm = lambda name: RMSNorm(cfg.norm_eps, dt, jnp.float32, name=name)  # noqa: E731
        post, comb, y = hc("attn_hc")(x)
        with jax.named_scope("attention"):
            a, kl = V4Attention(cfg.attention, self.layer_type, cfg.norm_eps, cfg.init_std, dt,
                                pdt, self.decode, cfg.max_seq_len, name="attention")(
                norm("attn_norm")(y), segment_ids, positions)
        x = expand(x, checkpoint_name(a, "attention_out"), post, comb)
        post, comb, y = hc("ffn_hc")(x)
        with jax.named_scope("moe"):
            f, stats = V4MoE(cfg.moe, self.is_hash, cfg.vocab_size, cfg.init_std, dt, pdt,
                             name="moe")(norm("ffn_norm")(y), bias, tokens, segment_ids > 0)
        return expand(x, checkpoint_name(f, "ffn_out"), post, comb), {**stats,
                                                                       "indexer_kl": kl}


def _block_class(cfg: V4Config) -> Any:
    return rematerialised(V4Block, cfg.remat_policy, cfg.scan_layers)


class V4Unit(nn.Module):
    """The repeated unit of a scanned segment: one block per kind (`block_{j}`)."""
    cfg: V4Config
    kinds: tuple[tuple[str, bool], ...]
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, biases: jax.Array, tokens: jax.Array,
                 segment_ids: jax.Array, positions: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        block, per = _block_class(self.cfg), []
        for j, (kind, is_hash) in enumerate(self.kinds):
            x, stats = block(self.cfg, kind, is_hash, self.decode, name=f"block_{j}")(
                x, biases[j], tokens, segment_ids, positions)
            per.append(stats)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *per)


class V4Layers(nn.Module):
    """All decoder layers, segment by segment; stats stacked to [L, ...] in layer order."""
    cfg: V4Config
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, biases: jax.Array, tokens: jax.Array,
                 segment_ids: jax.Array, positions: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        per_layer: list[dict[str, jax.Array]] = []
        for seg in layer_segments(self.cfg):
            rows = biases[seg.start:seg.start + seg.num_layers]
            if not seg.scanned:
                x, stats = _block_class(self.cfg)(self.cfg, *seg.kinds[0], self.decode,
                                                  name=seg.name)(x, rows[0], tokens,
                                                                 segment_ids, positions)
                per_layer.append(stats)
                continue
            scanned = nn.scan(
                V4Unit, variable_axes={"params": 0, "cache": 0, HASH_COLLECTION: 0},
                split_rngs={"params": True}, in_axes=(0, nn.broadcast, nn.broadcast,
                                                      nn.broadcast),
                length=seg.repeats, metadata_params={nn.PARTITION_NAME: "layers"})
            x, stats = scanned(self.cfg, seg.kinds, self.decode, name=seg.name)(
                x, rows.reshape(seg.repeats, len(seg.kinds), -1), tokens, segment_ids,
                positions)
            for i in range(seg.num_layers):
                rep, j = divmod(i, len(seg.kinds))
                per_layer.append(jax.tree.map(lambda a: a[rep, j], stats))  # noqa: B023
        return x, jax.tree.map(lambda *a: jnp.stack(a), *per_layer)


class V4MTP(nn.Module):
    """DeepSeek-V4 MTP block (the reference code's MTPBlock): its streams, then its own
    hyper-head + norm."""
    cfg: V4Config

    @nn.compact
    def __call__(self, streams: jax.Array, next_embedded: jax.Array, bias: jax.Array,
                 tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        norm = lambda name: RMSNorm(cfg.norm_eps, dt, jnp.float32, name=name)  # noqa: E731
        d = cfg.embed_dim
        init = normal_init(cfg.init_std, ("embed", None))
        e_proj = self.param("e_proj", init, (d, d), pdt)
        h_proj = self.param("h_proj", init, (d, d), pdt)
        e = linear(norm("enorm")(next_embedded), e_proj.astype(dt))
        x = e[:, :, None, :] + linear(norm("hnorm")(streams), h_proj.astype(dt))
        x, stats = _block_class(cfg)(cfg, cfg.mtp.layer_type, False, False, name="block")(
            x, bias, tokens, segment_ids, positions)
        y = HyperHead(cfg.hc.hc_mult, cfg.hc.eps, cfg.norm_eps, cfg.init_std, name="hc_head")(x)
        return norm("norm")(y), stats


class TransformerV4(nn.Module):
    """DeepSeek-V4 language model. `logits, aux = model.apply(variables, tokens, ...)`."""
    cfg: V4Config
    decode: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, with_mtp: bool = False,
                 return_hidden: bool = False) -> tuple[jax.Array, dict[str, Any]]:
        """`return_hidden`: the final normalised hidden states [B, L, D] instead of the
        logits, and `mtp_hidden` instead of `mtp_logits` (as `moejax.Transformer`)."""
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        embed = Embed(cfg.vocab_size, cfg.embed_dim, cfg.init_std, dt, pdt, name="embed")
        x = expand_streams(embed(tokens), cfg.hc.hc_mult)
        biases = balance_bias(self, "bias", cfg.num_layers, cfg.moe.num_experts)
        x, aux = V4Layers(cfg, self.decode, name="layers")(x, biases, tokens, segment_ids,
                                                           positions)
        aux["moe_loss"] = weighted_moe_loss(aux, cfg.moe.balance_loss_coef,
                                            cfg.moe.z_loss_coef)
        aux["indexer_loss"] = cfg.attention.indexer_loss_coef * aux["indexer_kl"].sum()
        h = HyperHead(cfg.hc.hc_mult, cfg.hc.eps, cfg.norm_eps, cfg.init_std, name="hc_head")(x)
        h = RMSNorm(cfg.norm_eps, dt, jnp.float32, name="final_norm")(h)
        head = LMHead(cfg.vocab_size, cfg.init_std, dt, pdt, name="head")
        out = h if return_hidden else head(h).astype(jnp.float32)
        if cfg.mtp.depth and not self.decode and (with_mtp or self.is_initializing()):
            nxt = next_tokens(tokens)
            mtp_bias = balance_bias(self, MTP_BIAS, 1, cfg.moe.num_experts)[0]
            mtp_h, stats = V4MTP(cfg, name="mtp")(x, embed(nxt), mtp_bias, nxt, segment_ids,
                                                  positions)
            aux.update(mtp_aux(mtp_h if return_hidden else head(mtp_h), stats,
                               cfg.moe.balance_loss_coef, cfg.moe.z_loss_coef, return_hidden))
            aux["indexer_loss"] += cfg.attention.indexer_loss_coef * stats["indexer_kl"]
        return out, aux
