"""python -m minildm.check: see runner.py."""
import sys

from .runner import main

sys.exit(main())
