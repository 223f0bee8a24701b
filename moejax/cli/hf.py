"""`moejax-hf {import,export}`: HuggingFace / DeepSeek checkpoints in and out of a moejax
workdir (moejax.interop.hf_cli; the same program as `python -m moejax.interop`).

Needs the `hf` extra (safetensors); without it the program says so in one line.
"""
from __future__ import annotations

import sys

try:
    from moejax.interop.hf_cli import main
    _MISSING: ModuleNotFoundError | None = None
except ModuleNotFoundError as error:  # the optional `hf` extra is not installed
    if error.name != "safetensors":
        raise
    _MISSING = error


def run() -> None:
    """The console script `moejax-hf`."""
    if _MISSING is not None:
        sys.exit(f"moejax-hf: {_MISSING.name} is not installed; "
                 "pip install 'moejax[hf]' brings it.")
    main()
