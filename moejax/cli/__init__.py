"""The command-line programs (console scripts; `train.py` / `eval.py` call the same code).

- `moejax-train` (`train.py`): moejax.cli.train;
- `moejax-eval` (`eval.py`): moejax.cli.eval;
- `moejax-hf` (`python -m moejax.interop`): moejax.cli.hf;
- `moejax-plan` (`python -m moejax.plan`), `moejax-aot` (`python -m moejax.aot`) and
  `moejax-plot` (`python -m moejax.plot`) are those modules' `main` (setup.cfg's
  console_scripts).

`--config` takes a config file (`configs/tiny.py`, `path.py:arg`) or the name of a
built-in one (`tiny`, `deepseek_v4:flash`; moejax.config.files). Each program defines its
absl flags when it runs, not when its module is imported, so the modules import side by
side (tests, notebooks).
"""
