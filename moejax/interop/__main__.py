"""`python -m moejax.interop {import,export}`: see `moejax.interop.hf_cli`."""
from moejax.interop.hf_cli import main

main()
