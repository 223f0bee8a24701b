"""Config fuzz: a value of another type for any field of a shipped config is a ValueError
naming the field (hypothesis; skipped without the `test` extra's hypothesis).
"""
from __future__ import annotations

import pathlib
import re

import pytest

from moejax.config import apply_overrides, load_config_file, resolve

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

CONFIG_FILES = ("tiny", "deepseek_v3", "deepseek_v4")


def _leaves(node, prefix=""):
    for key, value in node.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


FIELDS = sorted({(name, key, type(value)) for name in CONFIG_FILES for key, value in
                 _leaves(load_config_file(str(ROOT / "configs" / f"{name}.py")))},
                key=lambda f: (f[0], f[1]))
VALUES = {
    "none": st.none(),
    "bool": st.booleans(),
    "int": st.integers(-10**6, 10**6),
    "float": st.floats(allow_nan=False, allow_infinity=False).filter(
        lambda x: not x.is_integer()),
    "str": st.text(max_size=8),
    "list": st.lists(st.integers(-3, 3), max_size=3),
    "dict": st.dictionaries(st.sampled_from("abc"), st.integers(0, 3), max_size=2),
}
# The value kinds a field of each type accepts; every other kind must be refused.
ACCEPTED = {bool: {"bool"}, int: {"int"}, float: {"int", "float"}, str: {"str"},
            tuple: {"list"}}


def _other_kind(field_type):
    return st.sampled_from(sorted(set(VALUES) - ACCEPTED[field_type]))


@st.composite
def _wrong_type_override(draw):
    name, key, field_type = draw(st.sampled_from(FIELDS))
    kind = draw(_other_kind(field_type))
    return name, key, kind, draw(VALUES[kind])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_wrong_type_override())
def test_an_override_of_another_type_is_a_value_error_naming_the_field(case):
    """`load_config`'s parser + `resolve`: a value of another type for any field of any
    shipped config is refused with a ValueError naming the dotted field, never another
    exception from deeper down."""
    name, key, kind, value = case
    cfg = load_config_file(str(ROOT / "configs" / f"{name}.py"))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        apply_overrides(cfg, [f"{key}={value!r}"])
        resolve(cfg)


@pytest.mark.parametrize("key", ["optimizer.learning_rate", "model.rope.theta",
                                 "model.moe.capacity_factor"])
@pytest.mark.parametrize("text", ["1e999", "-1e999"])
def test_a_float_field_refuses_inf(key, text):
    """'1e999' parses to inf, which no float field means (NaN arrives as the string 'nan')."""
    cfg = load_config_file(str(ROOT / "configs" / "tiny.py"))
    apply_overrides(cfg, [f"{key}={text}"])
    with pytest.raises(ValueError, match=re.escape(key) + ".*finite"):
        resolve(cfg)
