"""Command line: ``python -m headops prune|shapley ...`` (see headops.cli)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
