"""moejax vs HuggingFace transformers: one DeepSeek-V3-shaped training step, side by side.

    python bench/vs_hf.py [--rounds 5] [--steps-per-round 2] [--json] [--config.x=y ...]

The model (`VS_HF`): vocab 256, hidden 256, 4 layers (the first dense, intermediate 1024),
16 routed experts of width 128 + 1 shared, top-8 (sigmoid scores, one group), MLA with
q_lora_rank 64, kv_lora_rank 64, qk_nope 32, qk_rope 16, v 32, 4 heads; batch 8 x 256
tokens; fp32. It is built once as a moejax config (configs/deepseek_v3.py plus the
overrides below) and exported to `DeepseekV3ForCausalLM` through
`moejax.interop.hf_config.hf_from_model`, so both sides have the same shapes.

A step on each side is the whole training step: forward, next-token cross-entropy,
backward, global-norm clipping at 1.0 and AdamW. moejax runs its jitted train step
(`bench/train_step.py`'s `StepRunner`: `moejax.train.make_train_step`, as train.py);
transformers runs eager PyTorch on `torch.set_num_threads(--threads)` (XLA:CPU uses every
core it sees) with its default attention ("sdpa") and experts ("grouped_mm") kernels.
Each side runs in its own worker process: in one process, PyTorch's step ran ~10x slower
after JAX had run. Rounds alternate (A B A B ...) so that load drifts hit both; each
side's step time is the median over all its timed steps; `ratio` = moejax tokens/s over
HF's. `*_step_cpu_ms` are medians of the process CPU time per step (all threads), which a
shared machine disturbs less than the wall time; `cpu_ratio` is HF's over moejax's.
Both MoEs are dropless: moejax's `dropless` dispatch (tokens sorted by expert, no capacity
buffers; the fastest moejax dispatch here, see bench/README.md) against HF's grouped_mm.
`--config.model.moe.dispatch=index` etc. measure the other dispatches. The file is also a
config file: `python bench/train_step.py --config bench/vs_hf.py` times the same model.
Layers are unrolled (`model.scan_layers=False`: 0.91x the scanned step time here, no
stacked residual buffers to zero-fill, write and read back; HF runs unrolled too).
The two reported losses differ and are not a comparison: moejax's learning rate warms up
over `optimizer.warmup_steps` (2000 here), HF's AdamW runs at the peak rate from step 0,
and both train on one repeated batch. The work per step is the same.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_step import StepRunner  # noqa: E402

from moejax.config import load_config, resolve  # noqa: E402

PROTO = "@vs_hf@ "  # prefix of the worker protocol's stdout lines
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VS_HF = [
    "model.vocab_size=256", "model.embed_dim=256", "model.num_layers=4",
    "model.num_dense_layers=1", "model.mlp_hidden=1024", "model.num_heads=4",
    "model.num_kv_heads=4", "model.head_dim=48", "model.max_seq_len=256",
    "model.moe.num_experts=16", "model.moe.expert_hidden=128", "model.moe.top_k=8",
    "model.moe.num_shared_experts=1", "model.moe.num_groups=1", "model.moe.top_groups=1",
    "model.moe.dispatch=dropless", "model.moe.balance_loss_coef=0.0",
    "model.moe.z_loss_coef=0.0", "model.scan_layers=False",
    "model.mla.q_lora_rank=64", "model.mla.kv_lora_rank=64", "model.mla.qk_nope_head_dim=32",
    "model.mla.qk_rope_head_dim=16", "model.mla.v_head_dim=32", "model.rope.yarn_factor=1.0",
    "model.mtp.depth=0", "model.dtype=float32", "model.param_dtype=float32",
    "train.batch_size=8", "train.seq_len=256", "optimizer.grad_clip_norm=1.0",
]


def moejax_config(overrides: list[str]) -> Any:
    """The VS_HF ConfigDict (configs/deepseek_v3.py + VS_HF + `overrides`), validated."""
    return load_config(os.path.join(ROOT, "configs", "deepseek_v3.py"), [*VS_HF, *overrides])


def get_config(arg: str | None = None) -> Any:
    """This file is also a config file: `bench/train_step.py --config bench/vs_hf.py`."""
    del arg
    return moejax_config([])


class HFRunner:
    """DeepseekV3ForCausalLM of the same config with AdamW; `step()` runs one step."""

    def __init__(self, cfg: Any, threads: int, seed: int = 0):
        import torch
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

        from moejax.interop.hf_config import hf_from_model
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.torch = torch
        self.model = DeepseekV3ForCausalLM(DeepseekV3Config(**hf_from_model(cfg.model,
                                                                            "float32")))
        self.model.train()
        o = cfg.optimizer
        self.clip = o.grad_clip_norm
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.learning_rate,
                                     betas=(o.b1, o.b2), eps=o.eps,
                                     weight_decay=o.weight_decay)
        t = cfg.train
        gen = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len),
                                    generator=gen)
        self.loss = float("nan")
        self.cpu_times: list[float] = []

    def describe(self) -> dict[str, Any]:
        c = self.model.config
        return {"hf_params": sum(p.numel() for p in self.model.parameters()),
                "hf_attn_implementation": getattr(c, "_attn_implementation", None),
                "hf_experts_implementation": getattr(c, "_experts_implementation", None),
                "torch_threads": self.torch.get_num_threads()}

    def step(self) -> float:
        """One training step; returns its wall time in seconds (CPU time to `cpu_times`)."""
        start, cpu = time.perf_counter(), time.process_time()
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(input_ids=self.tokens, labels=self.tokens).loss
        loss.backward()
        if self.clip > 0:
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.loss = float(loss.detach())
        elapsed = time.perf_counter() - start
        self.cpu_times.append(time.process_time() - cpu)
        return elapsed


def describe_moejax(runner: StepRunner) -> dict[str, Any]:
    from moejax.train import param_count
    return {"moejax_params": param_count(runner.state),
            "moejax_compile_seconds": runner.compile_seconds,
            "moejax_compile_cpu_seconds": runner.compile_cpu_seconds}


def worker(side: str, overrides: list[str], threads: int) -> None:
    """One side in this process: reports its description, then runs N steps per request.

    Protocol (stdout lines starting with PROTO): one JSON description after the setup
    (compilation included), then for each stdin line N > 0 the JSON
    {"wall": [s, ...], "cpu": [s, ...], "loss": x} of N steps; N = 0 or EOF ends it.
    """
    cfg = resolve(moejax_config(overrides))
    if side == "moejax":
        runner: Any = StepRunner(cfg)
        info = describe_moejax(runner)
    else:
        runner = HFRunner(cfg, threads)
        info = runner.describe()
    print(PROTO + json.dumps(info), flush=True)
    for line in sys.stdin:
        n = int(line)
        if n <= 0:
            break
        wall = [runner.step() for _ in range(n)]
        loss = runner.metrics.get("loss") if side == "moejax" else runner.loss
        print(PROTO + json.dumps({"wall": wall, "cpu": runner.cpu_times[-n:], "loss": loss}),
              flush=True)


class Worker:
    """A `worker` subprocess: each side has its own process, so neither framework's thread
    pools run (or spin) while the other is timed; the idle one waits on a pipe."""

    def __init__(self, side: str, overrides: list[str], threads: int):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", side,
               "--threads", str(threads), *[f"--config.{o}" for o in overrides]]
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith(PROTO):
                return json.loads(line[len(PROTO):])
        raise RuntimeError(f"the {self.side} worker exited with {self.proc.wait()} "
                           "(its error is above)")

    def steps(self, n: int) -> dict[str, Any]:
        """Runs n steps in the worker; {"wall": [...], "cpu": [...], "loss": x}."""
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def run(overrides: list[str], threads: int, warmup: int, rounds: int, per_round: int
        ) -> dict[str, Any]:
    """Starts both workers, alternates `rounds` rounds of `per_round` steps, returns the row."""
    cfg = resolve(moejax_config(overrides))
    ours, theirs = Worker("moejax", overrides, threads), Worker("hf", overrides, threads)
    try:
        ours.steps(warmup)
        theirs.steps(warmup)
        timed: dict[str, dict[str, list[float]]] = {"moejax": {}, "hf": {}}
        for _ in range(rounds):
            for side, w in (("moejax", ours), ("hf", theirs)):
                out = w.steps(per_round)
                for key in ("wall", "cpu"):
                    timed[side].setdefault(key, []).extend(out[key])
                timed[side]["loss"] = [out["loss"]]
    finally:
        ours.close()
        theirs.close()
    tokens = cfg.train.batch_size * cfg.train.seq_len
    med = {side: {k: statistics.median(v) for k, v in d.items()} for side, d in timed.items()}
    ours_t, hf_t = med["moejax"]["wall"], med["hf"]["wall"]
    return {"bench": "vs_hf", "overrides": overrides, "dispatch": cfg.model.moe.dispatch,
            "capacity_factor": cfg.model.moe.capacity_factor,
            "remat_policy": cfg.model.remat_policy, "batch_size": cfg.train.batch_size,
            "seq_len": cfg.train.seq_len, "moejax_step_time_ms": ours_t * 1e3,
            "hf_step_time_ms": hf_t * 1e3, "moejax_tokens_per_second": tokens / ours_t,
            "hf_tokens_per_second": tokens / hf_t, "ratio": hf_t / ours_t,
            "moejax_step_cpu_ms": med["moejax"]["cpu"] * 1e3,
            "hf_step_cpu_ms": med["hf"]["cpu"] * 1e3,
            "cpu_ratio": med["hf"]["cpu"] / med["moejax"]["cpu"], **ours.info, **theirs.info,
            "moejax_loss": med["moejax"]["loss"], "hf_loss": med["hf"]["loss"],
            "warmup": warmup, "rounds": rounds, "steps_per_round": per_round,
            "load_average": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--worker", choices=("moejax", "hf"), help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    if args.worker:
        worker(args.worker, overrides, args.threads)
        return
    row = run(overrides, args.threads, args.warmup, args.rounds, args.steps_per_round)
    if args.json:
        print(json.dumps(row), flush=True)
    else:
        print(f"moejax {row['moejax_tokens_per_second']:,.0f} tokens/s "
              f"({row['moejax_step_time_ms']:.0f} ms/step, {row['dispatch']}), "
              f"transformers {row['hf_tokens_per_second']:,.0f} tokens/s "
              f"({row['hf_step_time_ms']:.0f} ms/step): ratio {row['ratio']:.2f}x "
              f"(load {row['load_average']:.1f})", flush=True)


if __name__ == "__main__":
    main()
