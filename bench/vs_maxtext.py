"""moejax vs MaxText: the bench/vs_hf.py DeepSeek-V3-shaped training step, side by side.

    python bench/vs_maxtext.py [--maxtext-moe dense,capacity,ragged] [--steps 12] [--json]
                               [--maxtext-python /work/maxtext-venv/bin/python]

MaxText (0.2.5 from PyPI, Python >= 3.12) lives in its own virtual environment outside
this repository; nothing of it is imported here. Set it up once:

    /root/.pyenv/versions/3.12.1/bin/python -m venv /work/maxtext-venv
    /work/maxtext-venv/bin/pip install "maxtext[tpu]"   # the [tpu] extra also runs on CPU

Each MaxText run is a subprocess of its pre-training entry (`python -m
maxtext.trainers.pre_train.train <base.yml> key=value ...`) with `hardware=cpu`,
`dataset_type=synthetic`, `decoder_block=deepseek`, MLA, and the sizes of bench/vs_hf.py
(`maxtext_args`), fp32, no checkpoints. Its per-step log lines ("completed step: N,
seconds: S, ...") are parsed; the first `--skip` steps (compilation, warm-up) are dropped
and the median of the rest is MaxText's step time. MaxText's MoE paths (`--maxtext-moe`):

    dense     sparse_matmul=false, capacity_factor=-1: every expert on every token
    capacity  sparse_matmul=false, capacity_factor=1.25: GShard-style capacity buffers
    ragged    sparse_matmul=true, megablox=false: jax.lax.ragged_dot over sorted tokens

moejax's step (bench/vs_hf.py's config, `StepRunner`) is timed in this process between
the MaxText runs (moejax, MaxText, moejax, MaxText, ...), so load drifts hit both;
`ratio` = moejax tokens/s over MaxText's, one JSON line per MaxText path.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_step import StepRunner  # noqa: E402
from vs_hf import moejax_config  # noqa: E402

from moejax.config import Config, resolve  # noqa: E402

DEFAULT_PYTHON = "/work/maxtext-venv/bin/python"
MOE_PATHS = {
    "dense": ["sparse_matmul=false", "megablox=false", "capacity_factor=-1.0"],
    "capacity": ["sparse_matmul=false", "megablox=false", "capacity_factor=1.25"],
    "ragged": ["sparse_matmul=true", "megablox=false", "capacity_factor=-1.0"],
}
STEP_LINE = re.compile(r"completed step: (\d+), seconds: ([0-9.]+)")


def maxtext_args(cfg: Config, steps: int, workdir: str) -> list[str]:
    """MaxText base.yml overrides for the moejax config `cfg` (MLA DeepSeek-V3 shape)."""
    m, a, e, t, o = cfg.model, cfg.model.mla, cfg.model.moe, cfg.train, cfg.optimizer
    return [
        "run_name=vs_moejax", f"base_output_directory={workdir}", "hardware=cpu",
        "dataset_type=synthetic", "enable_checkpointing=false", "enable_tensorboard=false",
        "log_config=false", "skip_jax_distributed_system=true", f"steps={steps}",
        f"per_device_batch_size={t.batch_size}", f"max_target_length={t.seq_len}",
        "dtype=float32", "weight_dtype=float32", "matmul_precision=default",
        "scan_layers=true", "remat_policy=minimal", "enable_dropout=false",
        "decoder_block=deepseek", "attention_type=mla", "attention=dot_product",
        f"vocab_size={m.vocab_size}", f"base_emb_dim={m.embed_dim}",
        f"base_num_query_heads={m.num_heads}", f"base_num_kv_heads={m.num_heads}",
        f"base_mlp_dim={m.mlp_hidden}", f"base_moe_mlp_dim={e.expert_hidden}",
        f"base_num_decoder_layers={m.num_layers}", f"first_num_dense_layers={m.num_dense_layers}",
        "mlp_activations=['silu','linear']", "logits_via_embedding=false",
        f"normalization_layer_epsilon={m.norm_eps}", f"num_experts={e.num_experts}",
        f"num_experts_per_tok={e.top_k}", f"shared_experts={e.num_shared_experts}",
        f"routed_scaling_factor={e.routed_scaling_factor}", "routed_score_func=sigmoid",
        "routed_bias=true", f"q_lora_rank={a.q_lora_rank}", f"kv_lora_rank={a.kv_lora_rank}",
        f"qk_nope_head_dim={a.qk_nope_head_dim}", f"qk_rope_head_dim={a.qk_rope_head_dim}",
        f"v_head_dim={a.v_head_dim}", "rope_type=default",
        f"rope_max_timescale={int(m.rope.theta)}",
        f"max_position_embeddings={m.max_seq_len}", "opt_type=adamw",
        f"learning_rate={o.learning_rate}", f"adam_b1={o.b1}", f"adam_b2={o.b2}",
        f"adam_eps={o.eps}", f"adam_weight_decay={o.weight_decay}",
        f"gradient_clipping_threshold={o.grad_clip_norm}", "log_period=1000000",
    ]


def run_maxtext(python: str, cfg: Config, path: str, steps: int, skip: int,
                extra: list[str]) -> dict[str, Any]:
    """Runs MaxText's train entry once; returns its median step time (s) and the log tail."""
    with tempfile.TemporaryDirectory(prefix="vs_maxtext_") as workdir:
        base = subprocess.run([python, "-c", "import maxtext, os; print(os.path.dirname("
                               "maxtext.__file__))"], capture_output=True, text=True, check=True)
        base_yml = os.path.join(base.stdout.strip(), "configs", "base.yml")
        cmd = [python, "-m", "maxtext.trainers.pre_train.train", base_yml,
               *maxtext_args(cfg, steps, workdir), *MOE_PATHS[path], *extra]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
        env.pop("XLA_FLAGS", None)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    log = proc.stdout + proc.stderr
    steps_seen = [(int(s), float(t)) for s, t in STEP_LINE.findall(log)]
    times = [t for s, t in steps_seen if s >= skip]
    if proc.returncode != 0 or not times:
        raise RuntimeError(f"MaxText ({path}) exited with {proc.returncode} after "
                           f"{len(steps_seen)} logged steps; command:\n{' '.join(cmd)}\n"
                           f"log tail:\n{log[-3000:]}")
    return {"median_s": statistics.median(times), "steps_timed": len(times),
            "first_step_s": steps_seen[0][1]}


def time_moejax(runner: StepRunner, steps: int) -> list[float]:
    return [runner.step() for _ in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--maxtext-python", default=DEFAULT_PYTHON,
                        help="python of the MaxText virtual environment")
    parser.add_argument("--maxtext-moe", default="dense",
                        help=f"comma-separated MaxText MoE paths of {sorted(MOE_PATHS)}")
    parser.add_argument("--steps", type=int, default=12, help="MaxText steps per run")
    parser.add_argument("--skip", type=int, default=3, help="first MaxText steps dropped")
    parser.add_argument("--moejax-steps", type=int, default=6, help="moejax steps per round")
    parser.add_argument("--maxtext-arg", action="append", default=[],
                        help="extra MaxText key=value (repeatable)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    argv = sys.argv[1:]
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    if not os.path.exists(args.maxtext_python):
        sys.exit(f"vs_maxtext.py: MaxText's python {args.maxtext_python!r} does not exist. "
                 "Create the environment (see this file's docstring: python >= 3.12, "
                 "pip install 'maxtext[tpu]') or pass --maxtext-python PATH.")
    paths = args.maxtext_moe.split(",")
    unknown = sorted(set(paths) - set(MOE_PATHS))
    if unknown:
        sys.exit(f"vs_maxtext.py: unknown --maxtext-moe {unknown}; use {sorted(MOE_PATHS)}.")
    cfg = resolve(moejax_config(overrides))
    tokens = cfg.train.batch_size * cfg.train.seq_len
    runner = StepRunner(cfg)
    time_moejax(runner, 2)  # warm-up
    ours = time_moejax(runner, args.moejax_steps)
    for path in paths:
        theirs = run_maxtext(args.maxtext_python, cfg, path, args.steps, args.skip,
                             args.maxtext_arg)
        ours += time_moejax(runner, args.moejax_steps)
        ours_t = statistics.median(ours)
        row = {"bench": "vs_maxtext", "maxtext_moe": path, "overrides": overrides,
               "dispatch": cfg.model.moe.dispatch, "batch_size": cfg.train.batch_size,
               "seq_len": cfg.train.seq_len, "moejax_step_time_ms": ours_t * 1e3,
               "maxtext_step_time_ms": theirs["median_s"] * 1e3,
               "moejax_tokens_per_second": tokens / ours_t,
               "maxtext_tokens_per_second": tokens / theirs["median_s"],
               "ratio": theirs["median_s"] / ours_t,
               "maxtext_steps_timed": theirs["steps_timed"],
               "maxtext_first_step_s": theirs["first_step_s"],
               "moejax_compile_seconds": runner.compile_seconds,
               "load_average": os.getloadavg()[0]}
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"MaxText {path}: {row['maxtext_tokens_per_second']:,.0f} tokens/s, "
                  f"moejax {row['moejax_tokens_per_second']:,.0f} tokens/s: "
                  f"ratio {row['ratio']:.2f}x (load {row['load_average']:.1f})", flush=True)


if __name__ == "__main__":
    main()
