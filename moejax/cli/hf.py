"""`moejax-hf {import,export}`: HuggingFace / DeepSeek checkpoints in and out of a moejax
workdir (moejax.interop.hf_cli; the same program as `python -m moejax.interop`).

Needs the `hf` extra (safetensors); without it the program says so in one line.
"""
from __future__ import annotations

import sys

from moejax.interop.hf_cli import main


def run() -> None:
    """The console script `moejax-hf`."""
    try:
        import safetensors  # noqa: F401 - the optional `hf` extra; read only when used
    except ImportError:
        sys.exit("moejax-hf: safetensors is not installed; pip install 'moejax[hf]' brings it.")
    main()
