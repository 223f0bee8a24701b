"""Train configs/tiny.py (MoE) and configs/dense_baseline.py (same active FLOPs, dense) on
the same tokens; compare validation bits per byte against tokens and training FLOPs.

Both runs read the same batches (same data config, seed, batch and sequence length) and
evaluate on the same validation batches every `--eval-every` steps. Writes
`<out>/moe_vs_dense.png` and `<out>/moe_vs_dense.json` and prints the table.

    python bench/moe_vs_dense.py [--steps 600] [--eval-every 100] [--out runs/moe_vs_dense]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
from typing import Any

import moejax
from moejax.config import resolve
from moejax.train import train_and_evaluate
from moejax.train.metrics import flops_per_token

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS = {"moe (tiny)": "configs/tiny.py", "dense (dense_baseline)": "configs/dense_baseline.py"}


def curve(workdir: pathlib.Path) -> list[dict[str, float]]:
    """(step, validation bits per byte) records of a run's metrics.jsonl."""
    points = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "validation/bits_per_byte" in record:
            points.append({"step": record["step"],
                           "bits_per_byte": record["validation/bits_per_byte"]})
    return points


def run(name: str, path: str, args: argparse.Namespace) -> dict[str, Any]:
    overrides = [f"train.steps={args.steps}", f"train.eval_every={args.eval_every}",
                 f"train.save_every={args.steps}"]
    cfg = resolve(moejax.load_config(str(ROOT / path), overrides))
    workdir = pathlib.Path(args.out) / pathlib.Path(path).stem
    shutil.rmtree(workdir, ignore_errors=True)
    train_and_evaluate(cfg, workdir)
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    flops = flops_per_token(cfg.model, cfg.train.seq_len)
    points = [{**p, "tokens": p["step"] * tokens_per_step,
               "train_flops": p["step"] * tokens_per_step * flops} for p in curve(workdir)]
    return {"name": name, "config": path, "flops_per_token": flops, "points": points}


def plot(results: list[dict[str, Any]], out: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        for ax, key in zip(axes, ("tokens", "train_flops")):
            ax.plot([p[key] for p in r["points"]], [p["bits_per_byte"] for p in r["points"]],
                    marker="o", label=r["name"])
    for ax, label in zip(axes, ("training tokens", "training FLOPs")):
        ax.set_xlabel(label)
        ax.set_ylabel("validation bits per byte")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "moe_vs_dense.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--out", default="runs/moe_vs_dense")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run(name, path, args) for name, path in RUNS.items()]
    (out / "moe_vs_dense.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out)
    print(f"{'run':<24} {'FLOPs/token':>12} " + " ".join(
        f"{'step ' + str(p['step']):>10}" for p in results[0]["points"]))
    for r in results:
        print(f"{r['name']:<24} {r['flops_per_token']:>12.3g} "
              + " ".join(f"{p['bits_per_byte']:>10.4f}" for p in r["points"]))


if __name__ == "__main__":
    main()
