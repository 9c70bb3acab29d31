"""Command line: ``python -m headops prune --model smollm2 ...`` (see headops.prune_cli)."""

import sys

from .prune_cli import main

if __name__ == "__main__":
    sys.exit(main())
