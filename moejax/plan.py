"""Abstract model plan: parameter counts and training FLOPs per token, with no memory used.

    python -m moejax.plan --config configs/deepseek_v4.py:pro [--json] [--seq_len N]
    python -m moejax.plan --config configs/tiny.py
    python -m moejax.plan --config configs/deepseek_v4.py:flash --mesh fsdp=32,expert=8 \
        --chip v5p [--json] [--config.train.batch_size=256 ...]

The model is built with `jax.eval_shape(model.init, ...)` (shapes only), so a 1.6T-parameter
model plans on a laptop. A model section with `architecture = "deepseek_v4"` is a
DeepSeek-V4 model (`TransformerV4`), anything else a `moejax.Transformer`.

Reported (`--json`: one object with exactly these keys):

* `total_params`: the main model, MTP excluded (the published "total"), including the
  balance biases (HF's `e_score_correction_bias`; for V4 only the non-hash layers' rows,
  which exist in the checkpoint) and not V4's frozen `tid2eid` tables, so the figures
  equal spec 5.1 / 5.2's formulas.
* `mtp_params`: the MTP module (its balance bias included).
* `active_params`: per token, everything except the routed experts a token does not use
  ((E - k) of E per MoE layer) and except the input-embedding lookup (the LM head counts;
  with tied embeddings the table counts once, as the head).
* `embedding_params`: the input embedding table V * D.
* `flops_per_token`: training (forward + backward) FLOPs per token at `seq_len` =
  6 * active matmul weights (2 forward, 4 backward; norm scales, biases, sinks, position
  biases and mHC base / scale are not matmuls) + attention. Attention is 3 x the forward
  score and value matmuls, 3 * 2 * 2 * H * K * keys per layer, with no causal discount (the
  PaLM convention of moejax.train.metrics): keys = seq_len for GQA / MLA; for V4
  min(W, seq_len) window keys + seq_len / m' entries (HCA) or min(kI, seq_len / m) entries
  (CSA), plus the CSA indexer's forward scores 2 * HI * dI * seq_len / m (no backward: its
  top-k selection blocks the gradient).

With `--mesh` (axis=size pairs; axes not named are 1) the output adds `memory`
(moejax.plan_memory): per-device bytes of parameters, optimizer state, gradients and
activations per remat policy, from the sharded abstract train state; with `--chip` (v4,
v5e, v5p, v6e) TPU layout padding, the chip's HBM, whether it fits and the largest
`train.batch_size` that does.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

KEYS = ("total_params", "mtp_params", "active_params", "embedding_params", "flops_per_token")
NON_MATMUL = ("scale", "sinks", "position_bias", "base", "bias", "embedding")


def _leaves(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    return [(tuple(str(getattr(p, "key", p)) for p in path), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def _is_matmul(path: tuple[str, ...], leaf: Any) -> bool:
    return path[-1] not in NON_MATMUL and len(leaf.shape) >= 2


def _abstract(model: nn.Module) -> Any:
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))


def _routed(path: tuple[str, ...]) -> bool:
    """A routed-expert weight: moe/{gate,up,down} (not the shared expert's)."""
    return len(path) >= 2 and path[-2] == "moe" and path[-1] in ("gate", "up", "down")


def _count(variables: Any, num_experts: int, top_k: int
           ) -> tuple[dict[str, int], int]:
    """Counts over the params tree: total / mtp / active / active matmul weights."""
    totals = {"main": 0, "mtp": 0, "active": 0, "active_matmul": 0}
    for path, leaf in _leaves(variables["params"]):
        size = math.prod(leaf.shape)
        part = "mtp" if path[0] == "mtp" else "main"
        totals[part] += size
        if part == "mtp":
            continue
        used = size * top_k // num_experts if _routed(path) else size
        totals["active"] += used
        if _is_matmul(path, leaf):
            totals["active_matmul"] += used
    return totals, 0


def plan_v4(section: Any, seq_len: int) -> dict[str, float]:
    from moejax.model.v4.model import TransformerV4  # noqa: PLC0415
    from moejax.config.v4 import v4_config  # noqa: PLC0415
    cfg = v4_config(section)
    e, a = cfg.moe, cfg.attention
    variables = _abstract(TransformerV4(cfg))
    counts, _ = _count(variables, e.num_experts, e.top_k)
    biases = (cfg.num_layers - e.num_hash_layers) * e.num_experts
    embedding = cfg.vocab_size * cfg.embed_dim
    window = min(a.sliding_window, seq_len)
    attn = 0.0
    for kind in a.layer_types:
        keys = window
        if kind == "hca":
            keys += seq_len // a.hca_rate
        elif kind == "csa":
            keys += min(a.index_topk, seq_len // a.csa_rate)
            attn += 2 * a.index_heads * a.index_head_dim * (seq_len // a.csa_rate)
        attn += 3 * 2 * 2 * a.num_heads * a.head_dim * keys
    return {
        "total_params": counts["main"] + biases,
        "mtp_params": counts["mtp"] + (e.num_experts if cfg.mtp.depth else 0),
        "active_params": counts["active"] + biases - embedding,
        "embedding_params": embedding,
        "flops_per_token": float(6 * (counts["active_matmul"]) + attn),
    }


def plan_transformer(section: Any, seq_len: int) -> dict[str, float]:
    from moejax.config import model_config  # noqa: PLC0415
    from moejax.model.transformer import Transformer  # noqa: PLC0415
    m = model_config(section)
    variables = _abstract(Transformer(m))
    counts, _ = _count(variables, m.moe.num_experts, m.moe.top_k)
    embedding = m.vocab_size * m.embed_dim
    active = counts["active"] - (0 if m.tie_embeddings else embedding)
    matmul = counts["active_matmul"] + (embedding if m.tie_embeddings else 0)
    if getattr(m, "attention_type", "gqa") == "mla":
        qk = m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim
        per_head = qk + m.mla.v_head_dim
    else:
        per_head = 2 * m.head_dim
    attn = 3 * 2 * m.num_layers * seq_len * m.num_heads * per_head
    biases = variables.get("moe_bias", {})  # e_score_correction_bias rows (spec 5.2)
    main_bias = math.prod(biases["bias"].shape) if "bias" in biases else 0
    mtp_bias = math.prod(biases["mtp_bias"].shape) if "mtp_bias" in biases else 0
    return {"total_params": counts["main"] + main_bias, "mtp_params": counts["mtp"] + mtp_bias,
            "active_params": active + main_bias, "embedding_params": embedding,
            "flops_per_token": float(6 * matmul + attn)}


def plan(cfg: Any, seq_len: int | None = None) -> dict[str, float]:
    """The plan of a ConfigDict (an experiment) at `seq_len` (default: train.seq_len)."""
    if seq_len is None:
        seq_len = int(cfg.train.seq_len) if "train" in cfg else 4096
    if cfg.model.get("architecture", "transformer") == "deepseek_v4":
        return plan_v4(cfg.model, seq_len)
    return plan_transformer(cfg.model, seq_len)


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.4g}{unit}"
    return f"{n:.4g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moejax.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/x.py[:arg]")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.add_argument("--seq_len", type=int, default=None, help="default: train.seq_len")
    parser.add_argument("--mesh", default=None, help="e.g. fsdp=32,expert=8: add memory")
    parser.add_argument("--chip", default=None, help="v4, v5e, v5p or v6e (with --mesh)")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.") or "=" not in a]
    if bad:
        parser.error(f"unrecognised arguments {bad}; overrides look like --config.a.b=value")
    from moejax.config import apply_overrides, load_config_file  # noqa: PLC0415
    config = load_config_file(args.config)
    try:
        apply_overrides(config, [a[len("--config."):] for a in rest])
    except ValueError as err:
        print(f"moejax.plan: {err}", file=sys.stderr)
        return 2
    result = plan(config, args.seq_len)
    out: dict[str, Any] = {k: result[k] for k in KEYS}
    if args.mesh is not None or args.chip is not None:
        from moejax.plan_memory import memory_plan, parse_mesh  # noqa: PLC0415
        if args.seq_len is not None:
            config.train.seq_len = args.seq_len
        try:
            out["memory"] = memory_plan(config, parse_mesh(args.mesh or ""), args.chip)
        except ValueError as err:
            print(f"moejax.plan: {err}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(out))
        return 0
    for key in KEYS:
        print(f"{key:18s} {result[key]:>22,.0f}  ({_human(result[key])})")
    if "memory" in out:
        print(format_memory(out["memory"]))
    return 0


def format_memory(m: dict[str, Any]) -> str:
    """The memory plan as text (GiB per device)."""
    gib = lambda n: f"{n / 2**30:10.3f} GiB"  # noqa: E731
    mesh = " x ".join(f"{a} {s}" for a, s in m["mesh"].items())
    lines = [f"memory per device ({m['devices']} devices: {mesh}; "
             f"{m['rows_per_device']:g} rows per device per micro-batch"
             + (f"; {m['chip']} layout" if m["chip"] else "") + ")",
             f"  parameters        {gib(m['params_bytes'])}",
             f"  optimizer state   {gib(m['optimizer_bytes'])}",
             f"  other state       {gib(m['other_state_bytes'])}",
             f"  gradients (fp32)  {gib(m['gradient_bytes'])}",
             f"  layer working set {gib(m['layer_working_bytes'])}",
             "  activations by remat policy:"]
    for policy, size in m["activation_bytes"].items():
        mark = "  <- model.remat_policy" if policy == m["remat_policy"] else ""
        lines.append(f"    {policy:15s} {gib(size)}{mark}")
    lines.append(f"  total             {gib(m['total_bytes'])}")
    if "hbm_bytes" in m:
        lines.append(f"  HBM               {gib(m['hbm_bytes'])}: "
                     f"{'fits' if m['fits'] else 'does not fit'}; largest train.batch_size "
                     f"that fits: {m['max_batch_size']:,}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
