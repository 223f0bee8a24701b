"""Evaluate a moejax run: `python eval.py --config configs/tiny.py --workdir DIR`.

The same program as the `moejax-eval` console script (moejax/cli/eval.py says what it
does and its flags).
"""
from moejax.cli.eval import run

if __name__ == "__main__":
    run()
