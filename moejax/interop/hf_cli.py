"""`python -m moejax.interop {import,export}`: HF folders <-> moejax training workdirs.

DeepSeek-V3 and DeepSeek-V4 alike: import picks the converter by config.json's
`model_type` (`LOADERS`), export by the `hf_model_type` of the checkpoint's architecture
(`moejax.model.build.Architecture`; `SAVERS`), V4's frozen hash tables included.

    import --hf-dir DIR --workdir W [--mesh fsdp=-1] [--dtype auto] [--whole-model]
        Streams DIR into parameters sharded over `--mesh` (hf_stream: each process reads
        only the slices its devices own, FP8/FP4 dequantised per tile, so host memory stays
        near the process's shards, never the model), writes W/imported_config.py (the
        moejax config of the model with that mesh, every field declared) and an Orbax
        checkpoint at step 0 (parameters, fresh optimizer state, balance biases, data
        iterator) exactly as the training loop writes them. `--mesh` names mesh axes
        (`fsdp=4,expert=2`; unnamed axes 1; default: the config default, data=-1, i.e.
        replicated). `--dtype auto` is bfloat16 for FP8/FP4-quantised checkpoints, else
        config.json's dtype. `--whole-model` builds the model in host memory first
        (hf.load / hf_v4.load: the simple reference; small models only).
        Continue with: python train.py --config W/imported_config.py --workdir W
    export --workdir W --out DIR [--dtype bfloat16] [--step N]
        Writes the newest (or step N) checkpoint of W as a HF `deepseek_v3` / `deepseek_v4`
        folder.

--multihost (either command) starts distributed JAX first, as train.py does
(moejax/distributed.py): every process runs the command, the parameters are sharded over
all processes' devices, and process 0 writes the config file / the HF folder. W may be a
URL (gs://...); DIR and the HF folder are local.
"""
from __future__ import annotations

import argparse
import pathlib
import pprint
import sys
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from moejax import data as moedata
from moejax import distributed
from moejax.config import MESH_AXES, resolve
from moejax.interop import hf, hf_config, hf_stream, hf_v4, hf_v4_config
from moejax.model.build import architecture_of
from moejax.sharding import make_mesh, use_mesh
from moejax.storage import as_path
from moejax.train import checkpoint
from moejax.train.state import FROZEN, TrainState, make_setup

CONFIG_FILE = "imported_config.py"
_CONFIG_TEMPLATE = '''"""moejax config of the HuggingFace model imported from {source}.

Written by `python -m moejax.interop import`; train with
    python train.py --config {path} --workdir {workdir}
"""
import ml_collections

CONFIG = {body}


def get_config(arg=None):
    del arg
    return ml_collections.ConfigDict(CONFIG)
'''


def _mesh_sharded_over_all_devices(cfg: ml_collections.ConfigDict) -> None:
    """Any mesh restores a checkpoint: export splits the parameters over every device."""
    cfg.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "expert": 1, "tensor": 1})


def _load_v3(hf_dir: str, dtype: str) -> tuple[ml_collections.ConfigDict, dict]:
    return hf.load(hf_dir, dtype=dtype)


def _load_v4(hf_dir: str, dtype: str) -> tuple[ml_collections.ConfigDict, dict]:
    model, variables = hf_v4.load(hf_dir, param_dtype=dtype)
    tokenizer = pathlib.Path(hf_dir) / "tokenizer.json"
    return hf.config_dict(model, str(tokenizer.absolute()) if tokenizer.is_file()
                          else "byte"), variables


# HF model_type -> (HF folder, dtype) -> (moejax ConfigDict, variables); any other
# model_type goes to hf.load, whose error names the types it reads.
LOADERS = {hf_config.MODEL_TYPE: _load_v3, hf_v4_config.MODEL_TYPE: _load_v4}
# HF model_type -> save(model config, variables, out_dir, dtype, write=...).
SAVERS = {hf_config.MODEL_TYPE: hf.save, hf_v4_config.MODEL_TYPE: hf_v4.save}


def load_any(hf_dir: str, dtype: str = "float32") -> tuple[ml_collections.ConfigDict, dict]:
    """(moejax ConfigDict, variables) of a DeepSeek-V3 or -V4 HF folder (by model_type)."""
    model_type = hf.read_config(hf_dir).get("model_type")
    return LOADERS.get(model_type, _load_v3)(hf_dir, dtype)


def auto_dtype(hf_dir: str) -> str:
    """bfloat16 for a quantised (FP8 / FP4) checkpoint, else config.json's dtype (float32
    when it names none or another)."""
    hf_json = hf.read_config(hf_dir)
    if hf_json.get("quantization_config"):
        return "bfloat16"
    dtype = hf_json.get("dtype") or hf_json.get("torch_dtype")
    return dtype if dtype in ("bfloat16", "float32") else "float32"


def parse_mesh(text: str) -> dict[str, int]:
    """"fsdp=4,expert=2" -> every mesh axis' size (unnamed axes 1, one may be -1)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for item in filter(None, text.split(",")):
        axis, _, size = item.partition("=")
        if axis.strip() not in sizes or not size.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh {text!r}: expected axis=size pairs with axes in "
                             f"{MESH_AXES}, e.g. fsdp=4,expert=2 or fsdp=-1.")
        sizes[axis.strip()] = int(size)
    return sizes


def _variables_of(state: TrainState) -> dict[str, Any]:
    """The model-variables part of a TrainState-shaped tree (shapes or shardings)."""
    out = {"params": state.params, **state.frozen}
    if state.moe_bias:
        out["moe_bias"] = state.moe_bias
    return out


def import_checkpoint(hf_dir: str, workdir: str, dtype: str = "auto",
                      mesh_sizes: dict[str, int] | None = None, whole_model: bool = False
                      ) -> epath.Path:
    """HF folder -> `workdir` with a step-0 checkpoint and its config file; returns the file.

    Streams the tensors into sharded arrays (hf_stream) unless `whole_model`;
    `mesh_sizes` overrides the config's mesh sizes (see `parse_mesh`).
    """
    dtype = auto_dtype(hf_dir) if dtype == "auto" else dtype
    if whole_model:
        config, variables = load_any(hf_dir, dtype)
    else:
        plan = hf_stream.plan(hf_dir, dtype)
        config = hf_stream.config_dict(plan, hf_dir)
    if mesh_sizes:
        config.mesh.update(mesh_sizes)
    cfg = resolve(config)
    work = as_path(workdir)  # a local folder or a URL (moejax.storage)
    if checkpoint.latest_step(work) is not None:
        raise ValueError(f"{work} already holds checkpoints; import into a new --workdir.")
    distributed.sync("moejax: workdir checked")  # before any process creates in it
    mesh = make_mesh(cfg.mesh)
    with use_mesh(mesh):
        setup = make_setup(cfg, mesh)
        layout = _variables_of(setup.shardings)
        if whole_model:  # host arrays -> their shards (every process holds the whole)
            variables = jax.device_put(variables, layout)
        else:
            variables = hf_stream.stream(plan, _variables_of(setup.abstract), layout)
        params = variables["params"]
        # Made in place, shard by shard: an eager init of unsharded parameters under the
        # mesh made every device a whole copy (measured: 16 GiB peak for a 1.1 GiB model).
        opt_state = jax.jit(setup.tx.init, out_shardings=setup.shardings.opt_state)(params)
        state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                           opt_state=opt_state, moe_bias=variables.get("moe_bias", {}),
                           frozen={c: variables[c] for c in FROZEN if c in variables})
        state = jax.device_put(state, setup.shardings)  # places the step; the rest is laid out
        del variables, params, opt_state
        tokenizer = moedata.tokenizer_for_run(cfg.data, work)  # 'bpe:N': trained now
        if distributed.is_primary():
            moedata.save_tokenizer(tokenizer, work)
        train_it = moedata.make_train_iterator(
            cfg.data, tokenizer, cfg.train.seq_len, cfg.train.batch_size,
            jax.process_index(), jax.process_count())
        manager = checkpoint.make_manager(work, cfg.train.keep_checkpoints)
        try:
            checkpoint.save(manager, 0, state, train_it, cfg)
        finally:
            checkpoint.close(manager)
    path = work / CONFIG_FILE
    if distributed.is_primary():
        body = pprint.pformat(config.to_dict(), indent=1, width=96, sort_dicts=False)
        path.write_text(_CONFIG_TEMPLATE.format(source=hf_dir, path=path, workdir=work,
                                                body=body))
    return path


def restore_variables(workdir: str, step: int, setup: Any) -> dict[str, Any]:
    """Parameters, balance biases and frozen tables of checkpoint `step`, laid out as
    `setup` lays them out; the optimizer state is not read (Orbax partial restore)."""
    abstract = setup.abstract
    target = {k: v for k, v in (("params", abstract.params), ("moe_bias", abstract.moe_bias),
                                ("frozen", abstract.frozen)) if v}
    args = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(checkpoint.checkpoint_dir(workdir) / str(step) / "state",
                                        args=args)
    return {"params": restored["params"], "moe_bias": restored.get("moe_bias", {}),
            **restored.get("frozen", {})}


def export_checkpoint(workdir: str, out_dir: str, dtype: str | None = None,
                      step: int | None = None) -> int:
    """Checkpoint `step` (default: newest) of `workdir` -> HF folder; returns the step.

    Restores only the variables (no optimizer state), sharded over every device, and
    writes them tensor by tensor: each tensor is gathered to the host alone (host_view.py),
    every process takes part, process 0 writes.
    """
    step = checkpoint.latest_step(workdir) if step is None else step
    if step is None:
        raise ValueError(f"{workdir} holds no checkpoint to export.")
    config = ml_collections.ConfigDict(checkpoint.saved_config(workdir, step))
    _mesh_sharded_over_all_devices(config)
    cfg = resolve(config)
    mesh = make_mesh(cfg.mesh)
    with use_mesh(mesh):
        setup = make_setup(cfg, mesh)
        variables = restore_variables(workdir, step, setup)
        SAVERS[architecture_of(cfg.model).hf_model_type](
            cfg.model, variables, out_dir, dtype, write=distributed.is_primary())
    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moejax.interop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF folder -> moejax workdir (step-0 checkpoint)")
    imp.add_argument("--hf-dir", required=True, help="folder with config.json + safetensors")
    imp.add_argument("--workdir", required=True, help="new moejax workdir")
    imp.add_argument("--dtype", default="auto", help="parameter storage dtype (auto: "
                     "bfloat16 for FP8/FP4 checkpoints, else config.json's dtype)")
    imp.add_argument("--mesh", default="", help="mesh axis sizes, e.g. fsdp=-1 or "
                     "fsdp=4,expert=2 (unnamed axes 1; default: the config default)")
    imp.add_argument("--whole-model", action="store_true", help="build the model in host "
                     "memory first (the simple reference import; small models only)")
    exp = sub.add_parser("export", help="moejax workdir checkpoint -> HF folder")
    exp.add_argument("--workdir", required=True)
    exp.add_argument("--out", required=True, help="output folder (config.json + safetensors)")
    exp.add_argument("--dtype", default=None, help="weight dtype, e.g. bfloat16 (default: as "
                     "stored)")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    for command in (imp, exp):
        command.add_argument("--multihost", action="store_true",
                             help="call jax.distributed.initialize() first (as train.py)")
    args = parser.parse_args(argv)
    distributed.initialize(args.multihost)
    try:
        if args.command == "import":
            path = import_checkpoint(args.hf_dir, args.workdir, args.dtype,
                                     parse_mesh(args.mesh) if args.mesh else None,
                                     args.whole_model)
            print(f"imported {args.hf_dir} into {args.workdir} (step 0); continue with:\n"
                  f"  python train.py --config {path} --workdir {args.workdir}")
        else:
            step = export_checkpoint(args.workdir, args.out, args.dtype, args.step)
            print(f"exported step {step} of {args.workdir} to {args.out}")
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"moejax.interop {args.command}: {err}")


__all__ = ["auto_dtype", "export_checkpoint", "import_checkpoint", "load_any", "main",
           "parse_mesh"]
