"""python -m minildm.views: see cli.py."""
import sys

from .cli import main

sys.exit(main())
