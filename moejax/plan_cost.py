"""What a training run costs: FLOPs, wall time and chip-hours at an assumed MFU.

    python -m moejax.plan --config configs/deepseek_v4.py:flash --tokens 1e12 --chips 256 \\
        --chip v5p --mfu 0.3[,0.4,0.5] [--json]

    training FLOPs = flops_per_token (moejax.plan: 6 x active matmul weights + attention)
                     x tokens
    seconds        = training FLOPs / (chips x peak bf16 FLOP/s per chip x MFU)
    chip-hours     = chips x seconds / 3600;  tokens per chip-hour = tokens / chip-hours

The MFU is the user's assumption, not a measurement: it folds in everything the model
FLOPs leave out (remat recomputation, communication not hidden, the input pipeline,
restarts). Published points for scale: MaxText measured 33 % MFU for DeepSeek-V3-671B on
v5p-1024. Peak FLOP/s are the vendors' dense bf16 numbers per chip.
"""
from __future__ import annotations

from typing import Any

# Dense bf16 peak FLOP/s per chip (vendor data sheets: Cloud TPU system architecture pages,
# NVIDIA H100 / H200 SXM data sheets without sparsity).
PEAK_BF16_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12,
                   "h100": 989e12, "h200": 989e12}


def parse_mfus(text: str) -> list[float]:
    """'0.3' or '0.3,0.4,0.5' -> [0.3, ...]; each must be in (0, 1]."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 < v <= 1 for v in values):
        raise ValueError(f"--mfu {text!r}: give the model FLOPs utilisation you assume, a "
                         "fraction in (0, 1] or a comma-separated list, e.g. 0.3 or 0.3,0.4.")
    return values


def run_cost(flops_per_token: float, tokens: float, chips: int, chip: str, mfu: float
             ) -> dict[str, float]:
    """The cost of training on `tokens` tokens at an assumed `mfu` (see the module doc)."""
    if chip not in PEAK_BF16_FLOPS:
        raise ValueError(f"--chip {chip!r}: one of {sorted(PEAK_BF16_FLOPS)} for the cost.")
    if tokens <= 0 or chips <= 0:
        raise ValueError(f"--tokens {tokens:g} and --chips {chips}: both must be > 0.")
    flops = flops_per_token * tokens
    seconds = flops / (chips * PEAK_BF16_FLOPS[chip] * mfu)
    chip_hours = chips * seconds / 3600
    return {"mfu": mfu, "training_flops": flops, "seconds": seconds, "days": seconds / 86400,
            "chip_hours": chip_hours, "tokens_per_chip_hour": tokens / chip_hours}


def cost_plan(flops_per_token: float, tokens: float, chips: int, chip: str,
              mfus: list[float]) -> dict[str, Any]:
    """`--tokens/--chips/--chip/--mfu`: one `run_cost` per assumed MFU."""
    return {"tokens": tokens, "chips": chips, "chip": chip,
            "peak_flops_per_chip": PEAK_BF16_FLOPS.get(chip), "mfu_is_assumed": True,
            "runs": [run_cost(flops_per_token, tokens, chips, chip, m) for m in mfus]}


def format_cost(c: dict[str, Any]) -> str:
    """The cost plan as text, one line per assumed MFU."""
    lines = [f"cost of {c['tokens']:.4g} tokens on {c['chips']:,} {c['chip']} chips "
             f"({c['peak_flops_per_chip']:.4g} bf16 FLOP/s peak each; MFU assumed, "
             "not measured):",
             f"  {'MFU':>5} {'training FLOPs':>15} {'days':>9} {'chip-hours':>12} "
             f"{'tokens/chip-hour':>17}"]
    for r in c["runs"]:
        lines.append(f"  {r['mfu']:5.2f} {r['training_flops']:15.4g} {r['days']:9.2f} "
                     f"{r['chip_hours']:12,.0f} {r['tokens_per_chip_hour']:17,.0f}")
    return "\n".join(lines)
