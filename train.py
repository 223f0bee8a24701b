"""Train a moejax model: `python train.py --config configs/tiny.py --workdir DIR`.

The same program as the `moejax-train` console script (moejax/cli/train.py says what it
does, its flags and exit statuses).
"""
from moejax.cli.train import run

if __name__ == "__main__":
    run()
