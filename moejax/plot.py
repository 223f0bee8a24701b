"""Plots of runs: loss curves from metrics.jsonl and the expert-load heatmap (matplotlib, Agg).

    python -m moejax.plot WORKDIR [WORKDIR ...] [--out FILE] [--x step|tokens]

overlays the runs' train and validation cross-entropy in one `loss.png` (default:
WORKDIR/loss.png for one run, ./loss.png for several), each run labelled by its folder
name, e.g. an MoE run next to configs/dense_baseline.py's. For one run that has an
eval.json, it also writes WORKDIR/expert_load.png from the evaluation's measured load.

Train curve: `cross_entropy` (nats per target token, without the MoE / MTP loss terms,
so MoE and dense runs compare); validation: `validation/cross_entropy`. A resumed run
that logged a step twice is drawn with the newer value. Workdirs may be URLs
(moejax.storage). matplotlib is imported on first use, with the Agg backend (no display).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Sequence

import numpy as np

from moejax.storage import as_path
from moejax.train.expert_load import dead_threshold

PathLike = str | os.PathLike
TRAIN_KEY, VALIDATION_KEY = "cross_entropy", "validation/cross_entropy"


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend; ImportError naming the install if missing."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("moejax.plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_metrics(workdir: PathLike) -> list[dict[str, Any]]:
    """The records of `<workdir>/metrics.jsonl` (FileNotFoundError naming it if absent)."""
    path = as_path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{os.fspath(path)} does not exist; train first "
                                "(python train.py --workdir ...).")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key`, sorted by step; the last record of a step wins."""
    by_step = {int(r["step"]): float(r[key]) for r in records if key in r}
    steps = np.array(sorted(by_step), np.int64)
    return steps, np.array([by_step[s] for s in steps], np.float64)


def tokens_per_step(workdir: PathLike) -> int:
    """train.batch_size * train.seq_len from the run's config.json."""
    path = as_path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{os.fspath(path)} does not exist: --x tokens needs the "
                                "run's config.json (written by train.py).")
    train = json.loads(path.read_text())["train"]
    return int(train["batch_size"]) * int(train["seq_len"])


def run_name(workdir: PathLike) -> str:
    """A run's label: its folder name."""
    return os.path.basename(os.fspath(workdir).rstrip("/")) or os.fspath(workdir)


def _save(fig: Any, path: PathLike) -> str:
    """Writes `fig` as PNG to `path` (a file or URL), closes it, returns the path."""
    with as_path(path).open("wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return os.fspath(path)


def plot_losses(workdirs: Sequence[PathLike], path: PathLike, x: str = "step") -> str:
    """Train (line) and validation (dots) cross-entropy of each run against `x` ("step" or
    "tokens" = step * batch_size * seq_len); writes the PNG to `path` and returns it."""
    if x not in ("step", "tokens"):
        raise ValueError(f"x={x!r}: use 'step' or 'tokens'.")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, workdir in enumerate(workdirs):
        records = read_metrics(workdir)
        scale = tokens_per_step(workdir) if x == "tokens" else 1
        colour = f"C{i % 10}"
        steps, train = series(records, TRAIN_KEY)
        ax.plot(steps * scale, train, color=colour, label=f"{run_name(workdir)} train")
        steps, valid = series(records, VALIDATION_KEY)
        if len(steps):
            ax.plot(steps * scale, valid, "o--", color=colour,
                    label=f"{run_name(workdir)} validation")
    ax.set_xlabel("tokens" if x == "tokens" else "step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_expert_load(load: Any, path: PathLike, title: str = "expert load",
                     first_layer: int = 0) -> str:
    """Heatmap of the load share [L_moe, E] (rows: decoder layers from `first_layer`),
    with a colorbar; dead experts (share < 1/(10 E)) marked by a red x. Returns `path`."""
    load = np.asarray(load, np.float64)
    if load.ndim != 2 or load.size == 0:
        raise ValueError(f"expert load of shape {load.shape}: expected [MoE layers, experts].")
    rows, cols = load.shape
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(2 + 0.35 * cols, 16), min(1.5 + 0.35 * rows, 12)))
    image = ax.imshow(load, aspect="auto", cmap="viridis", interpolation="nearest",
                      vmin=0.0)
    fig.colorbar(image, ax=ax, label=f"share of routed pairs (uniform = 1/{cols})")
    dead_rows, dead_cols = np.nonzero(load < dead_threshold(cols))
    if len(dead_rows):
        size = float(np.clip(20000 / load.size, 4, 36))  # smaller marks on bigger grids
        ax.scatter(dead_cols, dead_rows, s=size, marker="x", color="red",
                   label=f"dead (< 1/{10 * cols})")
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    step = max(1, rows // 16)
    ax.set_yticks(range(0, rows, step), [str(first_layer + r) for r in range(0, rows, step)])
    ax.set_title(title)
    return _save(fig, path)


def plot_run_expert_load(workdir: PathLike, load: Any, first_layer: int,
                         step: int | None = None) -> str:
    """`<workdir>/expert_load.png` from a measured load [L_moe, E]; returns its path."""
    at = f" at step {step}" if step is not None else ""
    return plot_expert_load(load, as_path(workdir) / "expert_load.png",
                            f"{run_name(workdir)}: validation expert load{at}", first_layer)


def write_eval_plots(workdir: PathLike, expert_load: Any, first_layer: int,
                     step: int | None = None) -> dict[str, str]:
    """`loss.png` (when metrics.jsonl exists) and `expert_load.png` (when the model has
    MoE layers) in `workdir`; returns {"loss": path, "expert_load": path} of those written."""
    plots = {}
    if (as_path(workdir) / "metrics.jsonl").exists():
        plots["loss"] = plot_losses([workdir], as_path(workdir) / "loss.png")
    if len(expert_load):
        plots["expert_load"] = plot_run_expert_load(workdir, expert_load, first_layer, step)
    return plots


def eval_expert_load(workdir: PathLike) -> tuple[list, int, int | None]:
    """(expert_load, first MoE layer, step) from the run's eval.json and config.json."""
    result = json.loads((as_path(workdir) / "eval.json").read_text())
    config = as_path(workdir) / "config.json"
    first = (json.loads(config.read_text())["model"].get("num_dense_layers", 0)
             if config.exists() else 0)
    return result.get("expert_load", []), int(first), result.get("step")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m moejax.plot", description=(
        "Overlay the loss curves of moejax runs (loss.png); for a single run with an "
        "eval.json, also its expert-load heatmap (expert_load.png)."))
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR")
    parser.add_argument("--out", help="loss plot file (default: WORKDIR/loss.png for one "
                        "run, ./loss.png for several)")
    parser.add_argument("--x", choices=("step", "tokens"), default="step",
                        help="x axis: optimizer steps or training tokens")
    args = parser.parse_args(argv)
    workdirs = args.workdirs
    single = len(workdirs) == 1
    out = args.out or (as_path(workdirs[0]) / "loss.png" if single else "loss.png")
    try:
        print(plot_losses(workdirs, out, args.x))
        if single and (as_path(workdirs[0]) / "eval.json").exists():
            load, first, step = eval_expert_load(workdirs[0])
            if load:
                print(plot_run_expert_load(workdirs[0], load, first, step))
    except (FileNotFoundError, ValueError, ImportError) as e:
        parser.exit(2, f"moejax.plot: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
