"""DeepSeek-V4 vs DeepSeek-V3 training efficiency at small scale (configs/arch_small.py).

V4's announcement claims ~40 % better training efficiency than V3 (the same quality for
less compute). This trains a V3-shaped and a V4-shaped model of the same width, depth,
expert count and top-k, matched on training FLOPs per token (`moejax.plan`), each with its
own optimizer (V3 AdamW, V4 Muon), on the same batches of the built-in corpus, and
compares held-out bits per byte against cumulative training FLOPs:

* target: the worst final bits per byte among the headline runs (v3 and v4, every seed),
  so that each of them reaches it; every run's FLOPs to that target are interpolated
  linearly between the two validation points around the crossing;
* efficiency gain of X over v3 = FLOPs(v3) / FLOPs(X) - 1 (of the seed means; min/max over
  seed pairs);
* swaps: v3 with Muon, v4 with AdamW (also the "V4 without Muon" ablation);
* V4 ablations, one at a time: without mHC (hc_mult = 1: one residual stream, the mHC
  gates kept), without compressed attention (every layer the sliding branch with a window
  of the whole sequence: plain causal shared-KV attention, no CSA / HCA / indexer).

One compile per run kind (the seeds reuse it; bench/train_curves.py). Writes
`<out>/arch_efficiency.json` (raw curves, rewritten after every validation point, so a
stopped run leaves its partial curves), `<out>/arch_efficiency.png` and prints a markdown
table.

    python bench/arch_efficiency.py [--steps 300] [--eval-every 25] [--seeds 2]
        [--out runs/arch_efficiency] [--only v3,v4]
    python bench/arch_efficiency.py --quick     # a few minutes: 20 steps, 1 seed
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import moejax  # noqa: E402
from moejax.config import resolve  # noqa: E402
from moejax.plan import plan  # noqa: E402
from train_curves import (CompiledTrainer, efficiency_gain, flops_to_target,  # noqa: E402
                          spread)

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/arch_small.py"
HEADLINE = ("v3", "v4")
# name -> (config variant, overrides, what it is); HEADLINE runs get --seeds seeds, others 1
RUNS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "v3": ("v3", (), "V3: MLA, sigmoid routing, AdamW"),
    "v4": ("v4", (), "V4: CSA/HCA, mHC, hash layers, sqrtsoftplus, Muon"),
    "v3+muon": ("v3", ("optimizer.name='muon'",), "V3 with V4's optimizer (Muon)"),
    "v4+adamw": ("v4", ("optimizer.name='adamw'",),
                 "V4 with V3's optimizer (AdamW) = V4 without Muon"),
    "v4-mhc": ("v4", ("model.hc.hc_mult=1",), "V4 without mHC (one residual stream)"),
    "v4-compressed": ("v4", ("model.attention.layer_types=('sliding','sliding','sliding',"
                             "'sliding')", "model.attention.sliding_window=256",
                             "model.attention.indexer_loss_coef=0.0"),
                      "V4 without compressed attention (full causal window)"),
}


def make_config(variant: str, overrides: tuple[str, ...], args: argparse.Namespace) -> Any:
    train = [f"train.steps={args.steps}", f"train.eval_batches={args.eval_batches}"]
    cfg = moejax.load_config(f"{ROOT / CONFIG}:{variant}", [*train, *overrides])
    return cfg


def complete(seed_run: dict[str, Any], steps: int) -> bool:
    return bool(seed_run["points"]) and seed_run["points"][-1]["step"] == steps


def summarise(results: dict[str, Any], steps: int) -> dict[str, Any]:
    """Target, FLOPs to target per run (per seed and spread), gains over v3; only seeds
    that ran all `steps` count (a stopped run's partial curve stays in the JSON)."""
    done = {name: [s for s in r["seeds"] if complete(s, steps)] for name, r in results.items()}
    finals = [s["points"][-1]["bits_per_byte"] for name in HEADLINE for s in done.get(name, [])]
    if not finals:
        return {}
    target = max(finals)
    summary: dict[str, Any] = {"target_bits_per_byte": target, "runs": {}}
    for name, seeds in done.items():
        if not seeds:
            continue
        per_seed = [flops_to_target(s["points"], target) for s in seeds]
        last = [s["points"][-1] for s in seeds]
        summary["runs"][name] = {
            "seeds": len(seeds), "flops_to_target": per_seed,
            "flops_to_target_spread": (spread(per_seed) if None not in per_seed else None),
            "final_bits_per_byte": spread([p["bits_per_byte"] for p in last]),
            "train_wall_s": spread([p["train_wall_s"] for p in last]),
            "train_cpu_s": spread([p["train_cpu_s"] for p in last]),
            "cpu_s_to_target": [flops_to_target(s["points"], target, "train_cpu_s")
                                for s in seeds]}
    runs = summary["runs"]
    base = runs.get("v3", {}).get("flops_to_target_spread")
    for s in runs.values():
        s["gain_over_v3"] = (efficiency_gain(runs["v3"]["flops_to_target"], s["flops_to_target"])
                             if base and s["flops_to_target_spread"] else None)
    return summary


def _fmt_spread(s: dict[str, float] | None, fmt: str) -> str:
    if s is None:
        return "not reached"
    if s["min"] == s["max"]:
        return format(s["mean"], fmt)
    return f"{format(s['mean'], fmt)} ({format(s['min'], fmt)}-{format(s['max'], fmt)})"


def table(results: dict[str, Any], summary: dict[str, Any]) -> str:
    lines = [f"Target: {summary['target_bits_per_byte']:.4f} bits/byte (the worst final value "
             "of the v3 / v4 runs). Mean (min-max) over seeds.", "",
             "| run | seeds | FLOPs/token | final bits/byte | FLOPs to target | gain over v3 "
             "| CPU s to target | train wall s | train CPU s | compile wall / CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if name not in summary["runs"]:
            continue
        s = summary["runs"][name]
        gain, cpu = s["gain_over_v3"], s["cpu_s_to_target"]
        gain_text = "-" if gain is None else (
            f"{gain['mean']:+.1%}" if gain["min"] == gain["max"]
            else f"{gain['mean']:+.1%} ({gain['min']:+.1%} to {gain['max']:+.1%})")
        lines.append(
            f"| {name} | {s['seeds']} | {r['flops_per_token']:.4g} | "
            f"{_fmt_spread(s['final_bits_per_byte'], '.4f')} | "
            f"{_fmt_spread(s['flops_to_target_spread'], '.3g')} | {gain_text} | "
            f"{_fmt_spread(spread(cpu) if None not in cpu else None, '.0f')} | "
            f"{_fmt_spread(s['train_wall_s'], '.0f')} | {_fmt_spread(s['train_cpu_s'], '.0f')} | "
            f"{r['compile_s']:.0f} / {r['compile_cpu_s']:.0f} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], summary: dict[str, Any], path: pathlib.Path,
         steps: int = 0) -> None:
    """One line per run (seeds thin, their mean thick); `steps` > 0 marks stopped runs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (name, r) in enumerate(results.items()):
        color = f"C{i}"
        seeds = [s for s in r["seeds"] if s["points"]]
        for s in seeds:
            ax.plot([p["train_flops"] for p in s["points"]],
                    [p["bits_per_byte"] for p in s["points"]], color=color,
                    lw=0.8 if len(seeds) > 1 else 1.8, alpha=0.5 if len(seeds) > 1 else 1.0,
                    label=None if len(seeds) > 1 else
                    name + (" (stopped)" if steps and not complete(s, steps) else ""))
        if len(seeds) > 1:  # mean over the seeds' common evaluation points
            n = min(len(s["points"]) for s in seeds)
            ax.plot([seeds[0]["points"][j]["train_flops"] for j in range(n)],
                    [sum(s["points"][j]["bits_per_byte"] for s in seeds) / len(seeds)
                     for j in range(n)], color=color, lw=2.2,
                    label=f"{name} (mean of {len(seeds)} seeds)")
    if summary:
        ax.axhline(summary["target_bits_per_byte"], color="grey", ls="--", lw=0.8,
                   label="target")
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("configs/arch_small.py: DeepSeek-V3 vs V4 shapes, matched FLOPs/token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    values = [p["bits_per_byte"] for r in results.values() for s in r["seeds"]
              for p in s["points"]]
    if summary and values:  # the first evaluations can be far above the rest: cap the axis
        ax.set_ylim(min(values) - 0.05, min(max(values), summary["target_bits_per_byte"] + 2.0)
                    + 0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(path: pathlib.Path) -> None:
    """PNG and table of a written JSON; seeds that stopped early are left out of both."""
    doc = json.loads(path.read_text())
    steps = doc["meta"]["steps"]
    summary = summarise(doc["runs"], steps)
    plot(doc["runs"], summary, path.with_suffix(".png"), steps)
    meta = doc["meta"]
    print(f"{meta['date']}, {steps} steps, load average at start "
          f"{meta['load_average_start'][0]:.1f}, at the last write "
          f"{meta['load_average_now'][0]:.1f}; {meta['elapsed_wall_s']:.0f} s wall, "
          f"{meta['elapsed_cpu_s']:.0f} s CPU so far\n")
    if summary:
        print(table(doc["runs"], summary))


def machine() -> dict[str, Any]:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "load_average_start": os.getloadavg(), "argv": sys.argv}


def schedule(names: list[str], seeds: int) -> list[tuple[str, int]]:
    """(run, seed) in the order they train: the first seed of v3 and v4, then the V4
    optimizer swap, then the other seeds of v3 / v4, then the remaining runs, so that a
    run stopped early has the headline comparison first."""
    first = [(n, 0) for n in names if n in HEADLINE]
    swap = [(n, 0) for n in names if n == "v4+adamw"]
    more = [(n, s) for s in range(1, seeds) for n in names if n in HEADLINE]
    rest = [(n, 0) for n in names if n not in HEADLINE and n != "v4+adamw"]
    return first + swap + more + rest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-batches", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=2, help="seeds of v3 and v4")
    parser.add_argument("--only", default="", help=f"comma-separated runs of {list(RUNS)}")
    parser.add_argument("--quick", action="store_true",
                        help="v3 and v4 only (unless --only), 20 steps, validation every 10 "
                        "on 2 batches, 1 seed")
    parser.add_argument("--out", default="runs/arch_efficiency")
    parser.add_argument("--replot", metavar="JSON", default="",
                        help="only redraw the PNG (next to JSON) and print the table of a "
                        "written arch_efficiency.json (also a partial one)")
    args = parser.parse_args()
    if args.replot:
        replot(pathlib.Path(args.replot))
        return
    if args.quick:
        args.steps, args.eval_every, args.eval_batches, args.seeds = 20, 10, 2, 1
        args.only = args.only or ",".join(HEADLINE)
    names = args.only.split(",") if args.only else list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"--only: unknown runs {unknown}; choose from {list(RUNS)}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    trainers: dict[str, CompiledTrainer] = {}
    meta = {**machine(), "steps": args.steps, "eval_every": args.eval_every,
            "eval_batches": args.eval_batches}
    started = time.perf_counter(), time.process_time()

    def save() -> None:
        meta["elapsed_wall_s"] = time.perf_counter() - started[0]
        meta["elapsed_cpu_s"] = time.process_time() - started[1]
        doc = {"meta": {**meta, "load_average_now": os.getloadavg()},
               "summary": summarise(results, args.steps), "runs": results}
        (out / "arch_efficiency.json").write_text(json.dumps(doc, indent=1) + "\n")

    order = schedule(names, args.seeds)
    for i, (name, seed) in enumerate(order):
        variant, overrides, about = RUNS[name]
        if name not in trainers:
            raw = make_config(variant, overrides, args)
            trainers[name] = CompiledTrainer(resolve(raw))
            results[name] = {
                "about": about, "config": f"{CONFIG}:{variant}", "overrides": list(overrides),
                "flops_per_token": trainers[name].flops_per_token,
                "plan_flops_per_token": plan(raw)["flops_per_token"],
                "tokens_per_step": trainers[name].tokens_per_step,
                "compile_s": 0.0, "compile_cpu_s": 0.0, "seeds": []}
        trainer, r = trainers[name], results[name]
        run = {"seed": seed, "points": []}
        r["seeds"].append(run)

        def on_point(p: dict[str, float], run: dict[str, Any] = run, name: str = name,
                     seed: int = seed) -> None:
            run["points"].append(p)
            r = results[name]
            r["compile_s"], r["compile_cpu_s"] = trainers[name].compile_s, \
                trainers[name].compile_cpu_s
            print(f"{name} seed {seed} step {p['step']}: {p['bits_per_byte']:.4f} "
                  f"bits/byte ({p['train_wall_s']:.0f} s wall, "
                  f"{p['train_cpu_s']:.0f} s CPU)", flush=True)
            save()
        trainer.run(seed, args.eval_every, on_point)
        if all(later != name for later, _ in order[i + 1:]):
            del trainers[name]  # no more seeds of it: free its compiled steps
        summary = summarise(results, args.steps)
        if summary:
            plot(results, summary, out / "arch_efficiency.png", args.steps)
    save()
    summary = summarise(results, args.steps)
    print(f"\n{meta['date']}, {args.steps} steps, load average at start "
          f"{meta['load_average_start'][0]:.1f}, at the end {os.getloadavg()[0]:.1f}; "
          f"total {meta['elapsed_wall_s']:.0f} s wall, {meta['elapsed_cpu_s']:.0f} s CPU\n")
    if summary:
        print(table(results, summary))


if __name__ == "__main__":
    main()
