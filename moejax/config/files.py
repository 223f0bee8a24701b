"""Experiment config files and 'a.b.c=value' overrides, without absl (notebooks, tests).

`load_config("configs/tiny.py", overrides=["model.moe.num_experts=16"])` imports the file,
calls its `get_config()`, applies the overrides (unknown fields and wrong types are
ValueErrors naming the field) and validates the result (`moejax.config.validate`).
"""
from __future__ import annotations

import ast
import importlib.util
import pathlib
from typing import Any, Sequence

import ml_collections

from moejax.config.schema import validate


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r}: expected 'a.b.c=value'.")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = {"true": True, "false": False}.get(raw.lower(), raw)
    return key.strip(), value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies 'a.b.c=value' overrides in place; unknown fields raise ValueError."""
    for text in overrides:
        key, value = _parse_override(text)
        *parents, leaf = key.split(".")
        node = cfg
        for i, part in enumerate(parents):
            if part not in node:
                raise ValueError(f"override {text!r}: no field {'.'.join(parents[:i + 1])}.")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"override {text!r}: no field {key}; known fields of "
                             f"{'.'.join(parents) or 'the config'}: {sorted(node.keys())}.")
        current = node[leaf]
        if isinstance(value, bool) and current is not None and not isinstance(current, bool):
            # ConfigDict would store True as 1.0 in a float field: refuse it here.
            raise ValueError(f"{key}={value!r}: wrong type for this field (currently "
                             f"{current!r}); true/false only fits a true/false field.")
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            node[leaf] = value
        except TypeError as err:
            raise ValueError(f"{key}={value!r}: wrong type for this field "
                             f"(currently {current!r}): {err}") from None


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """Imports `path` and calls its get_config(arg). 'file.py:arg' also selects arg."""
    if arg is None and ":" in path and not pathlib.Path(path).exists():
        path, arg = path.rsplit(":", 1)
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path!r} does not exist.")
    spec = importlib.util.spec_from_file_location(f"_moejax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Notebook-friendly loading (no absl): config file + 'a.b=value' overrides, validated."""
    cfg = load_config_file(path)
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg
