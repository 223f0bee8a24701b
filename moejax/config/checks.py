"""The two checks every config section uses: a field's value is valid, or one of a set.

Both raise ValueError naming the field, the value and the fix.
"""
from __future__ import annotations

from typing import Any, Sequence


def check(ok: bool, field: str, value: Any, fix: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r} is invalid: {fix}")


def choice(field: str, value: str, choices: Sequence[str]) -> None:
    check(value in choices, field, value, f"use one of {list(choices)}.")
