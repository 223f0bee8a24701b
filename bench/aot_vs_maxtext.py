"""moejax vs MaxText, compiled ahead of time for the same TPU topology and tokens per step.

    python bench/aot_vs_maxtext.py [--topology v5p-1024] [--per-chip-batch 4] [--seq 8192]
        [--maxtext-python /work/maxtext-venv/bin/python] [--maxtext-arg key=value ...]
        [--config configs/deepseek_v3.py:671b] [--config.a.b=value ...] [--json]

Both sides compile DeepSeek-V3-671B's train step with XLA:TPU for a topology this machine
does not have (libtpu, JAX_PLATFORMS=cpu) and report per chip: state (arguments),
temporaries, host-offloaded bytes, the collectives of the optimized HLO by kind (loop
bodies times their trip counts, `moejax.hlo_stats`) and the compile time.

MaxText (0.2.5, Python >= 3.12, in its own virtual environment: bench/vs_maxtext.py's
set-up) runs as a subprocess of its own `train_compile` with the recipe `MAXTEXT_RECIPE` (fsdp over every chip, megablox grouped matmuls, custom remat with the
decoder-layer inputs offloaded to host, fp32 weights, AdamW); its "Memory analysis:" line
is parsed and its optimized HLO is dumped (`--xla_dump_to`) and counted here, so nothing
of MaxText is imported into this process. Its compile time is the subprocess's wall time
(Python start and config parsing included). moejax runs `moejax.aot.compile_train_step`
in this process on the config given (default: configs/deepseek_v3.py:671b with the
topology's chips and the same tokens per step).

Known limit (2026-12-06, 2-core machine): MaxText's Pallas kernels (megablox, flash
attention) do not compile for TPU in the environments pip gives today (maxtext 0.2.5 with
jax 0.12.0.1 + libtpu 0.0.52 or 0.0.50.1: "no such field: 'debug_locations'" or "Failed
to parse the Mosaic module"; jax 0.11.1 + libtpu 0.0.46.3: the latter). Without them
(`--maxtext-arg megablox=false --maxtext-arg attention=dot_product`) MaxText's step at
4 x 8192 tokens per chip on v5p-1024 is refused: 168.80G of temporaries (95.74G HBM).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

from moejax.aot import compile_train_step
from moejax.config import load_config
from moejax.hlo_stats import collective_stats
from moejax.topology import parse_topology

DEFAULT_PYTHON = "/work/maxtext-venv/bin/python"
MAXTEXT_RECIPE = [
    "model_name=deepseek3-671b", "ici_fsdp_parallelism=-1", "sparse_matmul=true",
    "megablox=true", "remat_policy=custom", "decoder_layer_input=offload",
    "weight_dtype=float32", "dtype=bfloat16", "opt_type=adamw", "dataset_type=synthetic",
    "enable_checkpointing=false", "skip_jax_distributed_system=true", "scan_layers=true",
]
_MEMORY = re.compile(r"Memory analysis: .*?\((.*)\)")
GIB = 2 ** 30


def maxtext_memory(log: str) -> dict[str, int]:
    """The fields of MaxText's printed `compiled.memory_analysis()` (CompiledMemoryStats)."""
    match = _MEMORY.search(log)
    if not match:
        return {}
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


def run_maxtext(python: str, topology: str, per_chip_batch: int, seq: int,
                extra: list[str]) -> dict[str, Any]:
    """Compiles MaxText's train step for `topology`; per-chip memory, collectives, seconds."""
    base = subprocess.run([python, "-c", "import maxtext, os; print(os.path.dirname("
                           "maxtext.__file__))"], capture_output=True, text=True, check=True)
    base_yml = os.path.join(base.stdout.strip(), "configs", "base.yml")
    with tempfile.TemporaryDirectory(prefix="aot_vs_maxtext_") as workdir:
        dump = os.path.join(workdir, "hlo")
        cmd = [python, "-m", "maxtext.trainers.pre_train.train_compile", base_yml,
               "run_name=aot_vs_moejax", f"base_output_directory={workdir}",
               f"compile_topology={topology}", "compile_topology_num_slices=1",
               f"per_device_batch_size={per_chip_batch}", f"max_target_length={seq}",
               *MAXTEXT_RECIPE, *extra]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
               "XLA_FLAGS": f"--xla_dump_to={dump} --xla_dump_hlo_as_text "
                            "--xla_dump_hlo_module_re=.*train_step.*"}
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
        seconds = time.perf_counter() - start
        log = proc.stdout + proc.stderr
        hlo = sorted(glob.glob(os.path.join(dump, "*after_optimizations.txt")),
                     key=os.path.getsize)
        stats = collective_stats(open(hlo[-1]).read()) if hlo else None
    memory = maxtext_memory(log)
    if proc.returncode != 0 or not memory:
        tail = "\n".join(log.strip().splitlines()[-15:])
        return {"error": f"exit {proc.returncode}", "log_tail": tail, "command": " ".join(cmd),
                "compile_seconds": seconds}
    host = (memory.get("host_argument_size_in_bytes", 0) + memory.get("host_output_size_in_bytes", 0)
            - memory.get("host_alias_size_in_bytes", 0) + memory.get("host_temp_size_in_bytes", 0))
    return {"state_bytes_per_chip": memory["argument_size_in_bytes"],
            "temp_bytes_per_chip": memory["temp_size_in_bytes"],
            "host_bytes_per_chip": host, "compile_seconds": seconds,
            "collective_bytes": stats.bytes if stats else {},
            "command": " ".join(cmd)}


def run_moejax(config: str, overrides: list[str], topology: str, per_chip_batch: int,
               seq: int) -> dict[str, Any]:
    chips = parse_topology(topology).chips
    cfg = load_config(config, [f"train.batch_size={chips * per_chip_batch}",
                               f"train.seq_len={seq}", *overrides])
    result = compile_train_step(cfg, topology, name=config)
    out = {k: getattr(result, k) for k in ("state_bytes_per_chip", "temp_bytes_per_chip",
                                           "host_bytes_per_chip", "compile_seconds",
                                           "collective_bytes", "mesh", "fits", "error")}
    out["tokens_per_step"] = result.tokens_per_step
    return out


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:8.2f}"


def report(rows: dict[str, dict[str, Any]]) -> str:
    kinds = sorted({k for r in rows.values() for k in r.get("collective_bytes", {})})
    lines = [f"{'per chip (GiB)':28s}" + "".join(f"{name:>12s}" for name in rows)]
    for key, label in (("state_bytes_per_chip", "state (arguments)"),
                       ("temp_bytes_per_chip", "temporaries"),
                       ("host_bytes_per_chip", "host-offloaded")):
        lines.append(f"{label:28s}" + "".join(f"{_gib(r.get(key)):>12s}" for r in rows.values()))
    for kind in kinds:
        lines.append(f"{kind + ' bytes':28s}" + "".join(
            f"{_gib(r.get('collective_bytes', {}).get(kind, 0)):>12s}" for r in rows.values()))
    lines.append(f"{'compile seconds':28s}" + "".join(
        f"{r.get('compile_seconds', 0):12.0f}" for r in rows.values()))
    for name, r in rows.items():
        if r.get("error"):
            lines.append(f"{name}: {r['error']}\n{r.get('log_tail', '')}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topology", default="v5p-1024")
    parser.add_argument("--per-chip-batch", type=int, default=4, help="sequences per chip")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--config", default="configs/deepseek_v3.py:671b")
    parser.add_argument("--maxtext-python", default=DEFAULT_PYTHON)
    parser.add_argument("--maxtext-arg", action="append", default=[], help="key=value")
    parser.add_argument("--skip", choices=("maxtext", "moejax"), default=None)
    parser.add_argument("--json", action="store_true")
    argv = sys.argv[1:]
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    if args.skip != "maxtext" and not os.path.exists(args.maxtext_python):
        sys.exit(f"aot_vs_maxtext.py: MaxText's python {args.maxtext_python!r} does not exist "
                 "(set-up: bench/vs_maxtext.py's docstring) or pass --skip maxtext.")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    rows: dict[str, dict[str, Any]] = {}
    if args.skip != "maxtext":
        rows["MaxText"] = run_maxtext(args.maxtext_python, args.topology, args.per_chip_batch,
                                      args.seq, args.maxtext_arg)
    if args.skip != "moejax":
        rows["moejax"] = run_moejax(args.config, overrides, args.topology,
                                    args.per_chip_batch, args.seq)
    print(json.dumps(rows) if args.json else report(rows))


if __name__ == "__main__":
    main()
