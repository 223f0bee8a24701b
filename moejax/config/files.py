"""Experiment config files and 'a.b.c=value' overrides, without absl (notebooks, tests).

`load_config("configs/tiny.py", overrides=["model.moe.num_experts=16"])` imports the file,
calls its `get_config()`, applies the overrides (unknown fields and wrong types are
ValueErrors naming the field) and validates the result (`moejax.config.validate`).

A bare name (`"tiny"`, `"deepseek_v4:flash"`) that is not a file in the current folder
names a built-in config: the repository's `configs/` folder, which a (non-editable)
install ships as `moejax/configs/` (setup.py maps the package onto the folder), so
`moejax-train --config tiny` works from any folder.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
from typing import Any, Sequence

import ml_collections

from moejax.config.schema import validate

_PACKAGE = pathlib.Path(__file__).resolve().parents[1]  # the moejax folder


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


def builtin_config_dir() -> pathlib.Path | None:
    """The built-in configs: `moejax/configs/` when installed, else the source tree's
    `configs/` next to the package (a checkout or an editable install); None if neither."""
    installed = _PACKAGE / "configs"
    if installed.is_dir():
        return installed
    checkout = _PACKAGE.parent
    if (checkout / "setup.cfg").is_file() and (checkout / "configs").is_dir():
        return checkout / "configs"
    return None


def builtin_config_names() -> list[str]:
    """Names `--config NAME` accepts (file stems of the built-in config folder)."""
    folder = builtin_config_dir()
    if folder is None:
        return []
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def config_path(spec: str) -> str:
    """`spec` ('path.py', 'path.py:arg', 'name' or 'name:arg') with a built-in name turned
    into that config's file path; an existing file (or anything else) is returned as is."""
    path, sep, arg = spec.partition(":")
    if pathlib.Path(spec).exists() or pathlib.Path(path).exists():
        return spec
    name = path[:-3] if path.endswith(".py") else path
    folder = builtin_config_dir()
    if folder is None or not name or os.sep in name or "/" in name:
        return spec
    file = folder / f"{name}.py"
    return f"{file}{sep}{arg}" if file.is_file() else spec


def config_file(spec: str) -> tuple[pathlib.Path, str | None]:
    """(file, arg) of a config spec (see `config_path`); FileNotFoundError naming the
    built-in configs when there is no such file."""
    path, arg = config_path(spec), None
    if ":" in path and not pathlib.Path(path).exists():
        path, arg = path.rsplit(":", 1)
    file = pathlib.Path(path)
    if not file.is_file():
        names = ", ".join(builtin_config_names()) or "none found"
        raise FileNotFoundError(f"config file {spec!r} does not exist (built-in configs, "
                                f"given by name: {names}).")
    return file, arg


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """Imports `path` and calls its get_config(arg). 'file.py:arg' also selects arg; a
    built-in name ('tiny', 'deepseek_v4:flash') selects that built-in config."""
    file, spec_arg = config_file(path)
    arg = spec_arg if arg is None else arg
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
