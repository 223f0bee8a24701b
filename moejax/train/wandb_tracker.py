"""Weights & Biases tracking of the training metrics (off unless `train.wandb_project`).

`pip install 'moejax[wandb]'`, then `--config.train.wandb_project=NAME` (entity, API key,
`WANDB_MODE=offline` and the rest come from wandb's environment variables). Process 0 opens
one wandb run per workdir: its id is kept in `<workdir>/wandb_run_id`, so a resumed
training continues the same run. Every record of metrics.jsonl is logged with its
training step as the x-axis (`step`, through `define_metric`), so the steps a resumed run
repeats after its checkpoint are drawn again instead of being dropped by wandb's own
monotonic step counter.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import secrets
from typing import Any, Mapping

from etils import epath

from moejax.config import Config
from moejax.storage import is_url

RUN_ID_FILE = "wandb_run_id"


def check_available(project: str) -> None:
    """ValueError (before anything is written) when tracking is asked for without wandb."""
    if project and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"train.wandb_project={project!r} needs wandb, which is not "
                         "installed: pip install 'moejax[wandb]' (or leave "
                         "train.wandb_project empty).")


class WandbTracker:
    """One wandb run; `log(step, metrics)` per metrics record, `close()` at the end."""

    def __init__(self, cfg: Config, workdir: epath.Path):
        # Imported here: wandb is optional (the `wandb` extra) and slow to import.
        import wandb

        id_file = workdir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
        self._run = wandb.init(
            project=cfg.train.wandb_project, id=run_id, resume="allow",
            name=workdir.name, config=dataclasses.asdict(cfg),
            dir=None if is_url(workdir) else os.fspath(workdir))
        if not id_file.exists():
            id_file.write_text(run_id + "\n")
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._run.log({"step": int(step), **{k: float(v) for k, v in metrics.items()}})

    def close(self) -> None:
        self._run.finish()


def open_tracker(cfg: Config, workdir: epath.Path, enabled: bool) -> WandbTracker | None:
    """The run's tracker: None unless `enabled` (process 0) and train.wandb_project is set."""
    if not (enabled and cfg.train.wandb_project):
        return None
    return WandbTracker(cfg, workdir)
