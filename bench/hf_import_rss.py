"""Peak host memory (RSS) of the HF import: streaming (hf_stream) vs the whole-model import.

    python bench/hf_import_rss.py --experts 32    # 1.68 GiB checkpoint, all imports
    python bench/hf_import_rss.py --no-whole      # 3.00 GiB checkpoint, streaming only
    python bench/hf_import_rss.py --experts 8 --cli   # + the import command itself

1. Generates a synthetic DeepSeek-V3-shaped checkpoint with numpy (no torch) in a temp
   folder: config.json with larger dims (D=2048, 64 experts of F=1024, 8 layers), FP8
   e4m3 projections and experts with fp32 128 x 128 `weight_scale_inv` blocks, bf16
   embeddings / norms, one safetensors shard per layer and an index.
2. Loads it onto 8 CPU devices, each way in child processes run under `/usr/bin/time -v`
   (peak RSS = "Maximum resident set size"), with the parameters sharded fsdp x expert
   (mesh fsdp=4, expert=2) in bf16:
     whole   1 process x 8 devices: `load_any` (the whole model in host memory, as
             `python -m moejax.interop import --whole-model`), then `device_put` to the
             shardings;
     stream  1 process x 8 devices and 2 processes x 4 devices: `hf_stream.plan` +
             `stream` (what `python -m moejax.interop import` does before it adds the
             fresh optimizer state and writes the step-0 checkpoint).
     baseline  the same child without an import (Python, JAX, moejax, the mesh).
   With --cli also `python -m moejax.interop import` itself (cli-stream, and cli-whole
   with --whole-model): it adds the fresh AdamW moments (two more copies of the
   parameters, in their dtype) and writes the step-0 Orbax checkpoint, so its train state
   is 3x the model; the same for both imports, and too much for this machine at the
   larger sizes.
3. Prints checkpoint bytes, the largest stored tensor and the largest moejax leaf, each
   process's shard bytes (its addressable shards) and its peak RSS.

A guard kills the children if the machine's available memory falls below 1.5 GiB (the
case is then reported as killed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GUARD_BYTES = 3 << 29  # 1.5 GiB
MESH = "fsdp=4,expert=2"


def v3_config(args: argparse.Namespace) -> dict:
    return {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
            "vocab_size": 32768, "hidden_size": 2048, "intermediate_size": 5632,
            "moe_intermediate_size": 1024, "num_hidden_layers": args.layers,
            "first_k_dense_replace": 1, "num_attention_heads": 16,
            "n_routed_experts": args.experts, "n_shared_experts": 1,
            "num_experts_per_tok": min(8, args.experts),
            "n_group": 1, "topk_group": 1, "kv_lora_rank": 256, "q_lora_rank": 768,
            "qk_rope_head_dim": 32, "v_head_dim": 64, "qk_nope_head_dim": 64,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
            "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                    "weight_block_size": [128, 128]}}


def layer_tensors(c: dict, layer: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of one decoder layer; kind fp8 | bf16 | f32."""
    d, h = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    p = f"model.layers.{layer}."
    out = [(p + "self_attn.q_a_proj.weight", (c["q_lora_rank"], d), "fp8"),
           (p + "self_attn.q_a_layernorm.weight", (c["q_lora_rank"],), "bf16"),
           (p + "self_attn.q_b_proj.weight", (h * qk, c["q_lora_rank"]), "fp8"),
           (p + "self_attn.kv_a_proj_with_mqa.weight",
            (c["kv_lora_rank"] + c["qk_rope_head_dim"], d), "fp8"),
           (p + "self_attn.kv_a_layernorm.weight", (c["kv_lora_rank"],), "bf16"),
           (p + "self_attn.kv_b_proj.weight",
            (h * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]), "fp8"),
           (p + "self_attn.o_proj.weight", (d, h * c["v_head_dim"]), "fp8"),
           (p + "input_layernorm.weight", (d,), "bf16"),
           (p + "post_attention_layernorm.weight", (d,), "bf16")]
    if layer < c["first_k_dense_replace"]:
        i = c["intermediate_size"]
        return out + [(p + "mlp.gate_proj.weight", (i, d), "fp8"),
                      (p + "mlp.up_proj.weight", (i, d), "fp8"),
                      (p + "mlp.down_proj.weight", (d, i), "fp8")]
    f, e = c["moe_intermediate_size"], c["n_routed_experts"]
    out += [(p + "mlp.gate.weight", (e, d), "bf16"),
            (p + "mlp.gate.e_score_correction_bias", (e,), "f32")]
    for j in range(e):
        out += [(p + f"mlp.experts.{j}.gate_proj.weight", (f, d), "fp8"),
                (p + f"mlp.experts.{j}.up_proj.weight", (f, d), "fp8"),
                (p + f"mlp.experts.{j}.down_proj.weight", (d, f), "fp8")]
    shared = f * c["n_shared_experts"]
    return out + [(p + "mlp.shared_experts.gate_proj.weight", (shared, d), "fp8"),
                  (p + "mlp.shared_experts.up_proj.weight", (shared, d), "fp8"),
                  (p + "mlp.shared_experts.down_proj.weight", (d, shared), "fp8")]


def generate(folder: pathlib.Path, c: dict, seed: int = 0) -> dict:
    """Writes the checkpoint (one shard per layer, embeddings in the last); returns stats."""
    import ml_dtypes
    from moejax.interop.safetensors_slices import write_safetensors
    rng = np.random.default_rng(seed)
    n = c["num_hidden_layers"]
    groups = [layer_tensors(c, layer) for layer in range(n)]
    v, d = c["vocab_size"], c["hidden_size"]
    groups.append([("model.embed_tokens.weight", (v, d), "bf16"),
                   ("model.norm.weight", (d,), "bf16"), ("lm_head.weight", (v, d), "bf16")])
    weight_map, largest = {}, ("", 0)
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape, kind in group:
            if kind == "fp8":  # random e4m3 bytes, NaN codes (x111 1111) replaced by 0
                raw = rng.integers(0, 256, shape, dtype=np.uint8)
                raw[(raw & 0x7F) == 0x7F] = 0
                tensors[name] = raw.view(ml_dtypes.float8_e4m3fn)
                blocks = tuple(-(-s // 128) for s in shape)
                tensors[name + "_scale_inv"] = rng.uniform(1e-4, 1e-3, blocks).astype(np.float32)
            else:
                dtype = ml_dtypes.bfloat16 if kind == "bf16" else np.float32
                tensors[name] = (0.02 * rng.standard_normal(shape, np.float32)).astype(dtype)
            nbytes = tensors[name].nbytes
            largest = max(largest, (name, nbytes), key=lambda t: t[1])
        write_safetensors(folder / file, tensors, {"format": "pt"})
        weight_map.update({k: file for k in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(c, indent=2))
    total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"checkpoint_bytes": total, "largest_tensor": largest[0],
            "largest_tensor_bytes": largest[1], "files": len(groups)}


# ----------------------------------------------------------------------------- child


def child(args: argparse.Namespace) -> None:
    """One import in this process; writes its shard bytes and timings to args.out."""
    import jax
    from moejax import distributed
    distributed.initialize(False)  # multi-process when JAX_COORDINATOR_ADDRESS is set
    import moejax
    from moejax.interop import hf_cli, hf_stream
    from moejax.sharding import make_mesh
    mesh = make_mesh(hf_cli.parse_mesh(args.mesh))
    start = time.perf_counter()
    if args.child == "baseline":  # the same process without an import
        variables = {}
    elif args.child == "stream":
        plan = hf_stream.plan(args.hf_dir, args.dtype)
        abstract, shardings = hf_stream.abstract_and_shardings(plan.model, mesh)
        variables = hf_stream.stream(plan, abstract, shardings)
    else:
        config, variables = hf_cli.load_any(args.hf_dir, args.dtype)
        model = moejax.model_config(config.model)
        abstract, shardings = hf_stream.abstract_and_shardings(model, mesh)
        variables = jax.device_put(variables, shardings)
    jax.block_until_ready(variables)
    seconds = time.perf_counter() - start
    leaves = jax.tree.leaves(variables)
    largest_leaf = max((math.prod(x.shape) * x.dtype.itemsize for x in leaves), default=0)
    shard_bytes = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
    model_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
    pathlib.Path(args.out).write_text(json.dumps({
        "process": jax.process_index(), "seconds": seconds, "shard_bytes": shard_bytes,
        "model_bytes": model_bytes, "largest_leaf_bytes": largest_leaf}))


# ----------------------------------------------------------------------------- parent


def _available_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux, as /usr/bin/time -v)."""
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(mode: str, processes: int, devices: int, hf_dir: pathlib.Path,
             work: pathlib.Path, dtype: str) -> list[dict]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
                   JAX_NUM_PROCESSES=str(processes))
    procs, files = [], []
    for i in range(processes):
        tag = work / f"{mode}-{processes}x{devices}-{i}"
        files.append(tag)
        if mode.startswith("cli"):  # the import command itself: train state + checkpoint
            run = ["-m", "moejax.interop", "import", "--hf-dir", str(hf_dir), "--workdir",
                   str(work / f"workdir-{mode}-{processes}x{devices}"), "--mesh", MESH,
                   "--dtype", dtype]
            run += ["--whole-model"] if mode == "cli-whole" else []
        else:
            run = [__file__, "--child", mode, "--hf-dir", str(hf_dir), "--mesh", MESH,
                   "--dtype", dtype, "--out", f"{tag}.json"]
        cmd = ["/usr/bin/time", "-v", "-o", f"{tag}.time", sys.executable, *run]
        log = open(f"{tag}.log", "w")
        procs.append(subprocess.Popen(cmd, env={**env, "JAX_PROCESS_ID": str(i)},
                                      stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                      start_new_session=True))  # killable as a group
        log.close()
    killed = False
    while any(p.poll() is None for p in procs):
        if _available_bytes() < GUARD_BYTES:
            killed = True
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)  # /usr/bin/time and its child
        time.sleep(0.2)
    results = []
    for i, (p, tag) in enumerate(zip(procs, files)):
        text = pathlib.Path(f"{tag}.time").read_text() if pathlib.Path(f"{tag}.time").exists() \
            else ""
        rss = [int(line.split(":")[1]) * 1024 for line in text.splitlines()
               if "Maximum resident set size" in line]
        out = pathlib.Path(f"{tag}.json")
        result = json.loads(out.read_text()) if out.exists() else {}
        if p.returncode and not killed:
            print(pathlib.Path(f"{tag}.log").read_text()[-3000:], file=sys.stderr)
        results.append({"mode": mode, "layout": f"{processes}x{devices}", "process": i,
                        "rc": p.returncode, "killed_by_guard": killed,
                        "peak_rss_bytes": rss[0] if rss else None, **result})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--no-whole", action="store_true", help="skip the whole-model import "
                        "(it needs ~2.3x the model in RAM)")
    parser.add_argument("--cli", action="store_true", help="also run `python -m moejax."
                        "interop import` itself, streaming and --whole-model (it adds the "
                        "AdamW moments and writes the step-0 checkpoint)")
    parser.add_argument("--keep", default="", help="generate into this folder and keep it")
    parser.add_argument("--child", choices=("baseline", "stream", "whole"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
    parser.add_argument("--mesh", default=MESH, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    work = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="hf_import_rss-"))
    hf_dir = work / "hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    try:
        stats = generate(hf_dir, v3_config(args))
        gib = lambda b: f"{b / 2**30:.2f} GiB" if b is not None else "-"  # noqa: E731
        print(f"checkpoint {gib(stats['checkpoint_bytes'])} in {stats['files']} files; "
              f"largest stored tensor {stats['largest_tensor']} "
              f"{gib(stats['largest_tensor_bytes'])}")
        rows = []
        cases = [("baseline", 1, 8), ("stream", 1, 8), ("stream", 2, 4), ("whole", 1, 8)]
        cases = cases[:3] if args.no_whole else cases
        if args.cli:
            cases += [(f"cli-{how}", p, 8 // p) for p in (1, 2) for how in ("stream", "whole")]
        for mode, processes, devices in cases:
            rows += run_case(mode, processes, devices, hf_dir, work, args.dtype)
            r = rows[-1]
            print(f"  {mode} {processes}x{devices} done (rc {r['rc']})", flush=True)
        first = next(r for r in rows if r.get("model_bytes"))
        print(f"model ({args.dtype}) {gib(first['model_bytes'])}; largest moejax leaf "
              f"{gib(first['largest_leaf_bytes'])}; mesh {MESH}")
        print(f"{'import':10} {'layout':7} {'proc':>4} {'shard bytes':>12} {'peak RSS':>10} "
              f"{'RSS - shards':>12} {'seconds':>8}")
        for r in rows:
            extra = (gib(r["peak_rss_bytes"] - r["shard_bytes"])
                     if "shard_bytes" in r and r["peak_rss_bytes"] else "-")
            note = " killed by the memory guard" if r["killed_by_guard"] else (
                f" rc {r['rc']}" if r["rc"] else "")
            print(f"{r['mode']:10} {r['layout']:7} {r['process']:>4} "
                  f"{gib(r.get('shard_bytes')):>12} {gib(r['peak_rss_bytes']):>10} "
                  f"{extra:>12} {r.get('seconds', float('nan')):>8.1f}{note}")
        print(json.dumps({"stats": stats, "rows": rows}))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
