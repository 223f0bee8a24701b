"""Test setup: 8 fake CPU devices so every sharding path runs without an accelerator.

XLA reads XLA_FLAGS once, when the backend starts, so this must happen before JAX is
imported anywhere (pytest imports conftest.py before the test modules).
"""
import os

# CPU-only test setting: LLVM at -O0. The suite's time is XLA:CPU compiling small programs,
# not running them; -O0 takes about a third off that CPU time (tests/test_generate.py and
# tests/test_attention.py from a cold cache: 70 s -> 44 s) and runs the same HLO. Subprocesses
# (subprocess_env) inherit it, so their persistent-cache entries are shared.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# XLA:CPU compiles dominate the suite on 2 cores; a persistent cache (shared with the
# train.py / eval.py subprocesses through subprocess_env) compiles each program once per
# machine. MOEJAX_TEST_JAX_CACHE moves it.
CACHE = os.environ.get("MOEJAX_TEST_JAX_CACHE",
                       os.path.join(tempfile.gettempdir(), "moejax-test-jax-cache"))
if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pathlib  # noqa: E402
import struct  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL_MODEL = [
    "model.vocab_size=128", "model.embed_dim=64", "model.num_layers=3",
    "model.num_dense_layers=1", "model.num_heads=4", "model.num_kv_heads=2",
    "model.head_dim=16", "model.mlp_hidden=128", "model.moe.num_experts=8",
    "model.moe.top_k=2", "model.moe.expert_hidden=32", "model.moe.group_size=32",
    "model.max_seq_len=256", "model.moe.balance_loss_coef=0.01", "model.moe.z_loss_coef=0.001",
    # tiny.py's quick start trains a BPE per run and shuffles rows; tests keep raw bytes
    "data.tokenizer=byte", "data.shuffle_window=0",
]


def subprocess_env() -> dict[str, str]:
    """Environment for train.py / eval.py subprocesses: CPU, 8 devices, the compile cache."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": CACHE,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def small_config(*overrides: str):
    """configs/tiny.py shrunk for fast tests, plus overrides ('a.b=value')."""
    from moejax.config import load_config
    return load_config(str(ROOT / "configs" / "tiny.py"), [*SMALL_MODEL, *overrides])


@pytest.fixture
def small_cfg():
    return small_config()


def read_events(logdir) -> list:
    """Every TensorBoard Event in `logdir`'s event files (TFRecord framing: length u64,
    its crc u32, the Event proto, its crc u32)."""
    from tensorboardX.proto import event_pb2
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
            at += 12 + length + 4
    return events
