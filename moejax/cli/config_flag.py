"""The `--config` flag of moejax-train / moejax-eval: ml_collections' config-file flag
(with `--config.a.b=value` overrides), whose value may also name a built-in config."""
from __future__ import annotations

import os
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

from moejax.config import config_file, config_path

DEFAULT_CONFIG = "tiny"  # the built-in configs/tiny.py, found from any folder
HELP = ("Experiment config: a file (configs/tiny.py, path.py:arg) or a built-in name "
        "(tiny, small, deepseek_v3:tiny, deepseek_v4:flash, ...); get_config() -> "
        "ConfigDict. Override fields with --config.a.b=value.")


class _ConfigSpecParser(flags.ArgumentParser):
    """ml_collections' config-file parser (`inner`), after turning a built-in name into
    its file; a missing file is a flag error naming the built-in configs (ml_collections
    would defer an IOError to the first use of the config)."""

    def __init__(self, inner: flags.ArgumentParser):
        self._inner = inner

    def parse(self, argument: str) -> ml_collections.ConfigDict:
        try:
            config_file(argument)  # before anything loads; absl reports a ValueError
        except FileNotFoundError as e:  # as "flag --config=...: <message>", no traceback
            raise ValueError(str(e)) from None
        return self._inner.parse(config_path(argument))

    def flag_type(self) -> str:
        return self._inner.flag_type()


def define_config_flag(default: str = DEFAULT_CONFIG) -> flags.FlagHolder:
    """Defines `--config` in absl's FLAGS. Without `--config` on the command line the
    default (and its overrides) is parsed here, as DEFINE_config_file does."""
    holder = config_flags.DEFINE_config_file("config", None, HELP, lock_config=True)
    flag = flags.FLAGS["config"]
    flag.parser = _ConfigSpecParser(flag.parser)
    flags.FLAGS.set_default("config", default)
    return holder


def show_in_help(names: list[str]) -> None:
    """Lists flags `names` in `--help` (absl shows the key flags of sys.argv[0]'s module;
    these flags are defined in moejax.cli, not in the script the user ran)."""
    for name in names:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])


def set_usage(doc: str) -> None:
    """`doc` as the program's `--help` text (absl prints the __main__ module's docstring:
    a console script's has none, train.py's is a pointer here)."""
    sys.modules["__main__"].__doc__ = doc


def program_name() -> str:
    """How the user called the program (`train.py`, `moejax-train`), for its messages."""
    return os.path.basename(sys.argv[0]) or "moejax"
