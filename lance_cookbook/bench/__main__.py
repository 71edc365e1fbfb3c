"""Entry point of ``python -m lance_cookbook.bench``: the command line of :mod:`lance_cookbook.bench.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
