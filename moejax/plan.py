"""Abstract model plan: parameter counts and training FLOPs per token, with no memory used.

    python -m moejax.plan --config configs/deepseek_v4.py:pro [--json] [--seq_len N]
    python -m moejax.plan --config configs/tiny.py
    python -m moejax.plan --config configs/deepseek_v4.py:flash --mesh fsdp=32,expert=8 \
        --chip v5p [--json] [--config.train.batch_size=256 ...]
    python -m moejax.plan --config configs/deepseek_v4.py:flash --tokens 1e12 --chips 256 \
        --chip v5p --mfu 0.3,0.4 [--json]

The model is built with `jax.eval_shape(model.init, ...)` (shapes only), so a 1.6T-parameter
model plans on a laptop. The model section's architecture (`moejax.model.build`) does the
counting: `moejax.model.counting.plan_transformer`, `moejax.model.v4.plan.plan_v4`.

Reported (`--json`: one object with exactly these keys):

* `total_params`: the main model, MTP excluded (the published "total"), including the
  balance biases (HF's `e_score_correction_bias`; for V4 only the non-hash layers' rows,
  which exist in the checkpoint) and not V4's frozen `tid2eid` tables, as the published
  totals count them (docs/deepseek_v3_v4.md, "Parameter counts").
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

With `--tokens`, `--chips`, `--chip` and `--mfu` it adds `cost` (moejax.plan_cost):
training FLOPs, days and chip-hours for that many tokens at each assumed MFU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import jax

from moejax.config import apply_overrides, load_config_file
from moejax.model.build import architecture_of
from moejax.plan_cost import cost_plan, format_cost, parse_mfus
from moejax.plan_memory import memory_plan, parse_mesh

KEYS = ("total_params", "mtp_params", "active_params", "embedding_params", "flops_per_token")


def plan(cfg: Any, seq_len: int | None = None) -> dict[str, float]:
    """The plan of a ConfigDict (an experiment) at `seq_len` (default: train.seq_len)."""
    if seq_len is None:
        seq_len = int(cfg.train.seq_len) if "train" in cfg else 4096
    return architecture_of(cfg.model).plan(cfg.model, seq_len)


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
    parser.add_argument("--chip", default=None,
                        help="v4, v5e, v5p or v6e (with --mesh); also h100, h200 for the cost")
    parser.add_argument("--tokens", type=float, default=None, help="training tokens: add cost")
    parser.add_argument("--chips", type=int, default=None, help="chips of the run (cost)")
    parser.add_argument("--mfu", default=None, help="assumed MFU(s) for the cost, e.g. 0.3,0.4")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.") or "=" not in a]
    if bad:
        parser.error(f"unrecognised arguments {bad}; overrides look like --config.a.b=value")
    if not os.environ.get("JAX_PLATFORMS"):
        # Shapes only: no accelerator is used, and with libtpu installed on a machine
        # without TPUs, starting the TPU backend would print initialisation errors.
        jax.config.update("jax_platforms", "cpu")
    config = load_config_file(args.config)
    try:
        apply_overrides(config, [a[len("--config."):] for a in rest])
    except ValueError as err:
        print(f"moejax.plan: {err}", file=sys.stderr)
        return 2
    result = plan(config, args.seq_len)
    out: dict[str, Any] = {k: result[k] for k in KEYS}
    if args.tokens is not None or args.mfu is not None:
        missing = [f for f in ("tokens", "chips", "chip", "mfu") if getattr(args, f) is None]
        try:
            if missing:
                raise ValueError(f"the cost needs --tokens, --chips, --chip and --mfu; "
                                 f"missing {', '.join('--' + f for f in missing)}.")
            out["cost"] = cost_plan(result["flops_per_token"], args.tokens, args.chips,
                                    args.chip, parse_mfus(args.mfu))
        except ValueError as err:
            print(f"moejax.plan: {err}", file=sys.stderr)
            return 2
    if args.mesh is not None or (args.chip is not None and "cost" not in out):
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
    if "cost" in out:
        print(format_cost(out["cost"]))
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
             f"  layer backward    {gib(m['layer_backward_bytes'])}",
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
