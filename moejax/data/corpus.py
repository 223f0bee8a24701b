"""The corpus a config names: `make_source(cfg.data, split)` and its description.

`data.source` picks the reader: "builtin" (the Python standard library's sources),
"text" (a file per document), "jsonl" / "arrayrecord" (a record per document, the
`data.text_field` field), "parquet" (a row per document, the `data.text_field` column).
"""
from __future__ import annotations

from moejax.config import DataConfig
from moejax.data.parquet import ParquetSource
from moejax.data.sources import (ArrayRecordSource, JsonlSource, _check_split, builtin_source,
                                 text_source)


def describe(cfg: DataConfig) -> str:
    """Human-readable name of the corpus for error messages."""
    if cfg.source == "builtin":
        return "data.source='builtin' (Python stdlib sources)"
    return f"data.source={cfg.source!r} data.path={cfg.path!r}"


def make_source(cfg: DataConfig, split: str):
    """The documents of `split` for `cfg`; raises ValueError naming the field to fix.

    Fails on an unknown data.source, a glob matching nothing, a validation split asked
    for with data.validation_fraction == 0, and an empty split.
    """
    _check_split(split)
    if split == "validation" and cfg.validation_fraction <= 0:
        raise ValueError(
            f"data.validation_fraction={cfg.validation_fraction!r} holds out no documents, so "
            "there is no validation split to evaluate; set it > 0 (e.g. 0.05).")
    if cfg.source == "builtin":
        src = builtin_source(split, cfg.validation_fraction)
    elif cfg.source == "text":
        src = text_source(cfg.path, split, cfg.validation_fraction)
    elif cfg.source == "jsonl":
        src = JsonlSource(cfg.path, cfg.text_field, split, cfg.validation_fraction)
    elif cfg.source == "arrayrecord":
        src = ArrayRecordSource(cfg.path, cfg.text_field, split, cfg.validation_fraction)
    elif cfg.source == "parquet":
        src = ParquetSource(cfg.path, cfg.text_field, split, cfg.validation_fraction)
    else:
        raise ValueError(f"data.source={cfg.source!r} is invalid: use one of "
                         "['builtin', 'text', 'jsonl', 'arrayrecord', 'parquet'].")
    if len(src) == 0:
        fix = "raise" if split == "validation" else "lower"
        raise ValueError(
            f"the {split} split of {describe(cfg)} is empty (data.validation_fraction="
            f"{cfg.validation_fraction}); {fix} data.validation_fraction or add documents.")
    return src
