"""The allowed values of config fields with a fixed set of choices (imports nothing).

Every validated choice lives here so that config, model and tools can import them
without an import cycle.
"""
import re

SCORE_FUNCTIONS = ("softmax", "sigmoid")
DISPATCHES = ("dense", "einsum", "index", "dropless")
EXPERT_PARALLEL = ("auto", "gspmd", "shard_map")  # who moves tokens to experts (see MoEConfig)
EXPERT_TRANSPORTS = ("auto", "all_gather", "ragged")  # shard_map transports
# how dropless runs its experts: "auto" = "ragged_dot" on GPU/TPU, "bulk" on CPU (dropless.py)
DROPLESS_BACKENDS = ("auto", "bulk", "loop", "ragged_dot")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_moe", "offload")  # remat.py
ROPE_STYLES = ("half", "interleaved")
ATTENTION_TYPES = ("gqa", "mla")
# model.architecture: "transformer" = `moejax.Transformer` (dense / DeepSeek-V2/V3 MoE, GQA or
# MLA; the ModelConfig fields below), "deepseek_v4" = `moejax.TransformerV4` (the model
# section holds `moejax.config.v4.V4Config`'s fields instead).
ARCHITECTURES = ("transformer", "deepseek_v4")
DTYPES = ("float32", "bfloat16", "float16")
# model/attention/core.py; "splash": TPU Pallas flash attention (MLA), attention/splash.py
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn", "reference", "splash")
MESH_AXES = ("data", "fsdp", "expert", "tensor")
NONFINITE_POLICIES = ("stop", "skip")  # train.nonfinite (moejax/train/guard.py)
# data.tokenizer "bpe:N": a byte-level BPE of N ids trained on the train split
# (moejax/data/bpe.py); N covers the 256 bytes and its 2 special tokens (eos, pad).
BPE_PREFIX = "bpe:"
BPE_MIN_VOCAB = 258


def bpe_vocab_size(spec: str) -> int | None:
    """4096 for "bpe:4096"; None for a spec that is not a BPE spec; ValueError if malformed."""
    if not spec.startswith(BPE_PREFIX):
        return None
    match = re.fullmatch(r"bpe:(\d+)", spec)
    if match is None or int(match.group(1)) < BPE_MIN_VOCAB:
        raise ValueError(f"data.tokenizer={spec!r} is invalid: use 'bpe:N' with N >= "
                         f"{BPE_MIN_VOCAB} (the 256 bytes plus {BPE_MIN_VOCAB - 256} special "
                         "tokens), e.g. 'bpe:4096'.")
    return int(match.group(1))
