"""python -m minildm.train: see cli.py."""

from .cli import main

main()
