"""ConfigDict sections -> frozen dataclasses, value by value, with errors naming the field.

`dataclass_from_dict(cls, section, "model")` converts each declared field to its type
(int, float (finite), bool, str, tuple, nested dataclass) and raises ValueError naming the path of
an unknown field or a value of the wrong type; `moejax.config` validates the values after.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Sequence

import ml_collections


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Converts one ConfigDict value to the declared field type, or raises ValueError."""
    if _is_dataclass_type(tp):
        return dataclass_from_dict(tp, value, path)
    origin = typing.get_origin(tp)
    if origin in (tuple, Sequence) or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path}={value!r}: expected a list.")
        return tuple(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}={value!r}: expected true/false.")
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        if not number or isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{path}={value!r}: expected an integer.")
        return int(value)
    if tp is float:
        if not number or not math.isfinite(value):
            raise ValueError(f"{path}={value!r}: expected a finite number.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path}={value!r}: expected a string.")
        return value
    return value


def dataclass_from_dict(cls: type, values: Any, path: str) -> Any:
    """Builds dataclass `cls` from a mapping; unknown keys raise a ValueError naming them."""
    if dataclasses.is_dataclass(values):
        return values
    if isinstance(values, ml_collections.ConfigDict):
        values = values.to_dict()
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a section (dict), got {values!r}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"{path}: unknown field(s) {unknown}; known fields are {sorted(names)}.")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}") for k, v in values.items()}
    return cls(**kwargs)
