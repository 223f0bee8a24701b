"""Test setup: 8 fake CPU devices so every sharding path runs without an accelerator.

XLA reads XLA_FLAGS once, when the backend starts, so this must happen before JAX is
imported anywhere (pytest imports conftest.py before the test modules).
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
