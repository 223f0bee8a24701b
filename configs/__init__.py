"""Built-in experiment configs, one per file (`--config tiny` or `--config configs/tiny.py`).

Installed with the package as `moejax.configs` (setup.py); each file's `get_config(arg)`
returns an `ml_collections.ConfigDict`.
"""
