"""Orbax checkpoints: the train state, the grain iterator state and the resolved config.

Layout: `<workdir>/checkpoints/<step>/{state, data, config}`, one Orbax
`CheckpointManager` step per save, written asynchronously (the device-to-host copy happens
inside `save`, the file writes in a background thread) and finalised atomically, so a run
killed mid-save leaves only a temporary directory that `latest_step` ignores.

  state   `ocp.args.StandardSave(TrainState)`; restored with `StandardRestore` onto the
          abstract state of the *current* mesh, so a checkpoint restores onto any mesh.
  data    the data iterator's streams (`moejax.data.iterator_checkpoint_args`), one JSON
          for the whole job, so a run resumes on any number of processes.
  config  the resolved config as JSON (`ocp.args.JsonSave`).

Before a run touches a workdir that already holds checkpoints, `check_compatible` reads the
newest one's config (through a read-only manager) and compares its model section with the
current one; any difference outside `RUNTIME_MODEL_FIELDS` (fields that change how the
model computes, not which parameters it has or what they mean) raises a ValueError listing
the fields, before anything is written.

A damaged checkpoint (a truncated or deleted file in any item, unreadable metadata) is
not the end of a run: `restore_newest` (train.py) and `load_newest_state` (eval.py) try
the steps newest first; when an older one restores, every newer one that failed is
reported with its step, path and error and renamed to `<step>.corrupt-<n>` (never
deleted; Orbax ignores such names). When none restores, nothing is moved and the error
names each step: the cause is then more likely the config (e.g. another optimizer) than
the files. All processes agree on each step's outcome before one of them renames.

A save that fails (a full disk, a quota, a file-size limit) is raised as
`CheckpointWriteError` naming the folder and the newest complete checkpoint, which is kept:
Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it only when every
item is written, and removes old checkpoints (`train.keep_checkpoints`) only after that.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath

from moejax import distributed
from moejax.config import Config
from moejax.data import iterator_checkpoint_args
from moejax.storage import as_path, is_url
from moejax.train.state import TrainState

CHECKPOINT_DIR = "checkpoints"
CORRUPT = "corrupt"  # a set-aside checkpoint is renamed <step>.corrupt-<n>
# Managers that only read (latest step, config, restore). Not `read_only=True`: Orbax logs
# "Given directory is read only" at WARNING for every such manager it opens (several per
# eval.py run), a warning users would learn to ignore. These never call save or delete, and
# create no folder, write no root metadata (hence no barrier across processes) and start no
# async-save thread, so they change nothing on disk all the same.
READ_ONLY = ocp.CheckpointManagerOptions(create=False, save_interval_steps=0,
                                         save_root_metadata=False,
                                         enable_async_checkpointing=False)
# Model fields that may change between a checkpoint and the run that resumes it.
RUNTIME_MODEL_FIELDS = frozenset({
    "dtype", "remat_policy", "attention_impl", "moe.dispatch", "moe.group_size",
    "moe.capacity_factor", "moe.balance_loss_coef", "moe.z_loss_coef",
    "moe.bias_update_rate", "moe.expert_parallel", "moe.expert_transport",
    "moe.dropless_backend"})


# URL schemes whose checkpoints Orbax can write (its arrays go through TensorStore's
# `gcs` kvstore; everything else must be a local path). See moejax/storage.py.
CHECKPOINT_SCHEMES = ("gs",)


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    """Where the CheckpointManager of `workdir` keeps its steps (a local path or gs://)."""
    path = as_path(workdir) / CHECKPOINT_DIR
    scheme = os.fspath(path).split("://", 1)[0] if is_url(path) else None
    if scheme is not None and scheme not in CHECKPOINT_SCHEMES:
        raise ValueError(
            f"workdir {os.fspath(workdir)!r}: Orbax checkpoints can be written to a local "
            f"path or {[s + '://' for s in CHECKPOINT_SCHEMES]}, not {scheme}://; use a "
            "local (or GCSFuse-mounted) workdir or a gs:// bucket.")
    return path


def config_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain JSON-able nested dicts."""
    return dataclasses.asdict(cfg)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def model_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """'field: saved -> current' for every non-runtime model field that differs."""
    old, new = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key in RUNTIME_MODEL_FIELDS:
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            diffs.append(f"model.{key}: {old.get(key, '<absent>')!r} -> "
                         f"{new.get(key, '<absent>')!r}")
    return diffs


def latest_step(workdir: str | os.PathLike) -> int | None:
    """Newest complete checkpoint step in `workdir`, or None; reads only."""
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        return None
    with ocp.CheckpointManager(
            directory, options=READ_ONLY) as manager:
        return manager.latest_step()


def saved_config(workdir: str | os.PathLike, step: int) -> dict[str, Any]:
    """The resolved config stored with checkpoint `step` (read-only)."""
    with ocp.CheckpointManager(
            checkpoint_dir(workdir),
            options=READ_ONLY) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))
    return restored["config"]


class IncompatibleCheckpoint(ValueError):
    """A readable checkpoint that this run must not resume (another model, an old layout)."""


def _refuse_other_model(workdir: str | os.PathLike, step: int, saved: Mapping[str, Any],
                        cfg: Config) -> None:
    diffs = model_differences(saved.get("model", {}), config_dict(cfg)["model"])
    if diffs:
        raise IncompatibleCheckpoint(
            f"workdir {str(workdir)!r} holds a checkpoint (step {step}) of a different model:"
            f" {'; '.join(diffs)}. Use a new --workdir, or restore the saved model config "
            f"(see {checkpoint_dir(workdir)}/{step}/config). Nothing was changed.")


def check_compatible(workdir: str | os.PathLike, cfg: Config) -> int | None:
    """Raises ValueError if the newest checkpoint with a readable config holds another
    model; returns its step (read-only: damaged newer ones are left to `restore_newest`)."""
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        return None
    with ocp.CheckpointManager(directory, options=READ_ONLY) as manager:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                saved = manager.restore(step, args=ocp.args.Composite(
                    config=ocp.args.JsonRestore()))["config"]
            except Exception:  # noqa: BLE001 - damaged: restore_newest reports it
                continue
            _refuse_other_model(workdir, step, saved, cfg)
            return step
    return None


def make_manager(workdir: str | os.PathLike, keep: int) -> ocp.CheckpointManager:
    """Asynchronous manager keeping the newest `keep` checkpoints (creates the folder)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: TrainState, iterator: Any,
         cfg: Config) -> bool:
    """Starts an asynchronous save of state + iterator + config at `step`.

    Call it before the iterator yields the next batch, so the saved iterator position
    matches the state. Returns whether a save was started (False if `step` exists).
    """
    if step in manager.all_steps():
        return False
    return manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=iterator_checkpoint_args(iterator, restore=False),
        config=ocp.args.JsonSave(config_dict(cfg))), force=True)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, permissions); every complete
    older checkpoint is kept, and the run can resume from the newest of them."""


def write_error(manager: ocp.CheckpointManager, step: int | None, error: Exception
                ) -> CheckpointWriteError:
    """The CheckpointWriteError of a failed save of `step`, naming the folder, the cause
    and the newest complete checkpoint left (Orbax leaves the failed one as
    `<step>.orbax-checkpoint-tmp`, which no restore reads)."""
    try:
        manager.reload()
        kept = [s for s in manager.all_steps() if s != step]
    except Exception:  # noqa: BLE001 - the message must not fail in turn
        kept = []
    newest = (f"the newest complete checkpoint, step {max(kept)}, is kept" if kept
              else "no complete checkpoint is left")
    which = "a checkpoint" if step is None else f"the checkpoint of step {step}"
    return CheckpointWriteError(
        f"{which} could not be written to {manager.directory} ({_short(error)}); {newest}. "
        "Free space (or fix the folder's permissions) and run the same command to resume.")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: TrainState,
            iterator: Any, cfg: Config | None = None) -> TrainState:
    """Restores checkpoint `step` onto `abstract_state`'s shardings; the iterator in place.

    With `cfg`, the saved config is read first and another model is refused
    (`IncompatibleCheckpoint`), so every item of the checkpoint is read.
    """
    if cfg is not None:
        saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        _refuse_other_model(os.fspath(manager.directory.parent), step, saved["config"], cfg)
    legacy = _grain_data_state(manager, step, iterator)
    if legacy is not None:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        iterator.set_state(legacy)
        return restored["state"]
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=iterator_checkpoint_args(iterator, restore=True)))
    iterator.set_state(restored["data"])
    return restored["state"]


def _newest_that_restores(manager: ocp.CheckpointManager, attempt: Any,
                          required: bool = True) -> tuple[Any, int | None]:
    """`attempt(step)` on the steps newest first until one works on every process; sets
    the newer failures aside (see the module docstring). (None, None) without steps."""
    failures: list[tuple[int, str]] = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            result, error = attempt(step), ""
        except IncompatibleCheckpoint:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to read is a damaged step
            result, error = None, _short(e)
        errors = [x for x in distributed.allgather_json(error) if x]
        if not errors:
            for bad, why in failures:
                set_aside(epath.Path(manager.directory), bad, why, required)
            distributed.sync("moejax: damaged checkpoints set aside")
            if failures:
                manager.reload()
            return result, step
        failures.append((step, errors[0]))
    if failures:
        listing = "; ".join(f"step {s} ({epath.Path(manager.directory) / str(s)}): {e}"
                            for s, e in failures)
        raise ValueError(
            f"no checkpoint in {manager.directory} restores: {listing}. If the config "
            "changed (e.g. optimizer.name), restore it; if the files are damaged, move "
            "them aside to start afresh. Nothing was changed.")
    return None, None


def _short(error: Exception) -> str:
    """'Type: first line of the message' (Orbax / TensorStore messages run long: a longer
    line keeps its start, the operation, and its end, the OS error)."""
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else ""
    if len(line) > 300:
        line = f"{line[:140]} ... {line[-150:]}"
    return f"{type(error).__name__}: {line}"


def restore_newest(manager: ocp.CheckpointManager, abstract_state: TrainState, iterator: Any,
                   cfg: Config) -> tuple[TrainState | None, int | None]:
    """(state, step) of the newest checkpoint whose every item restores, the iterator set
    to its position; damaged newer ones are set aside. (None, None) without checkpoints."""
    return _newest_that_restores(
        manager, lambda step: restore(manager, step, abstract_state, iterator, cfg))


def set_aside(directory: epath.Path, step: int, why: str, required: bool = True
              ) -> epath.Path | None:
    """Renames `directory/step` to `directory/<step>.corrupt-<n>` (process 0; never deletes).

    Returns the new path, or None where the rename failed and is not `required` (a
    read-only workdir seen by eval.py: the step is then only reported).
    """
    source = directory / str(step)
    n = 0
    while (directory / f"{step}.{CORRUPT}-{n}").exists():
        n += 1
    target = directory / f"{step}.{CORRUPT}-{n}"
    if jax.process_index() != 0:
        return target
    try:
        source.rename(target)
    except OSError as e:
        if required:
            raise OSError(f"checkpoint step {step} at {source} does not restore ({why}) "
                          f"and cannot be set aside as {target}: {e}") from e
        print(f"checkpoint step {step} at {source} does not restore ({why}); left in "
              f"place ({e}), using an older one.", file=sys.stderr, flush=True)
        return None
    print(f"checkpoint step {step} at {source} does not restore ({why}); set aside as "
          f"{target}, using an older one.", file=sys.stderr, flush=True)
    return target


def _grain_data_state(manager: ocp.CheckpointManager, step: int, iterator: Any
                      ) -> dict[str, Any] | None:
    """The data state of a checkpoint written before data streams, or None.

    Such checkpoints hold grain's per-process iterator JSON (`data/process_<i>-of-<n>.json`).
    One process with one stream read exactly today's stream 0, so its state carries over;
    a multi-process one read per-process document shares that no longer exist.
    """
    folder = epath.Path(manager.directory) / str(step) / "data"
    files = sorted(folder.glob("process_*-of-*.json")) if folder.exists() else []
    if not files:
        return None
    if len(files) > 1 or files[0].name != "process_0-of-1.json" or \
            list(iterator.streams) != [0] or len(iterator.rows) != iterator.rows_per_stream:
        raise IncompatibleCheckpoint(
            f"checkpoint {folder.parent} was written by {len(files)} process(es) before "
            "moejax read one global batch for all processes (data.streams); its data "
            "position can only be resumed by one process with data.streams=1. Resume it "
            "so, or start a new --workdir.")
    return {"rows_per_stream": iterator.rows_per_stream,
            "streams": {"0": json.loads(files[0].read_text())}}


def load_state(workdir: str | os.PathLike, abstract_state: TrainState,
               step: int | None = None) -> TrainState:
    """The train state of checkpoint `step` (default: newest) of `workdir`, read-only.

    `abstract_state` (e.g. `make_setup(cfg, mesh).abstract`) gives the shapes and the
    target shardings, so this loads onto any mesh (evaluation, a different topology).
    """
    step = latest_step(workdir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir(workdir)}.")
    with ocp.CheckpointManager(
            checkpoint_dir(workdir),
            options=READ_ONLY) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]


def load_newest_state(workdir: str | os.PathLike, abstract_state: TrainState, cfg: Config
                      ) -> tuple[TrainState, int]:
    """(state, step) of the newest checkpoint of `workdir` whose config and state restore
    (another model is refused); damaged newer ones are set aside as in `restore_newest`."""
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise FileNotFoundError(f"no complete checkpoint in {directory}.")

    def attempt(step: int) -> TrainState:
        saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        _refuse_other_model(workdir, step, saved["config"], cfg)
        return manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]

    with ocp.CheckpointManager(directory, options=READ_ONLY) as manager:
        state, step = _newest_that_restores(manager, attempt, required=False)
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {directory}.")
    return state, step


def close(manager: ocp.CheckpointManager) -> None:
    """Waits for pending saves, then closes the manager."""
    try:
        manager.wait_until_finished()
    finally:
        manager.close()
