"""Packages, with the repository's configs/ folder installed as moejax/configs/.

Everything else is in setup.cfg. setup.cfg's `packages = find:` cannot add a package that
lives outside moejax/, hence this file: the built-in experiment configs stay in the
top-level configs/ folder of the checkout and ship with the package, so that after a
non-editable install `moejax-train --config tiny` finds them
(moejax.config.files.builtin_config_dir).
"""
from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["moejax", "moejax.*"]), "moejax.configs"],
      package_dir={"moejax.configs": "configs"})
