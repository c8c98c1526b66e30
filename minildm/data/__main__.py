"""python -m minildm.data: see sets.py."""

from .sets import main

main()
